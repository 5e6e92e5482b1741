"""The image's scripts: the entrypoint that picks a service and the health probe compose and the
mTLS probes run, against real gRPC servers."""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import subprocess
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bulkhead_cli.certs import write_dev_certs
from shared.tls import TlsConfig, server_credentials
from tests.deploy.k8s_helpers import DEPLOY, ROOT

HEALTHCHECK = DEPLOY / "healthcheck.py"


async def _probe(service: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HEALTHCHECK),
        service,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    return subprocess.CompletedProcess(service, proc.returncode, out.decode(), err.decode())


async def _health_server(tls: TlsConfig | None) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = (
        server.add_secure_port("127.0.0.1:0", server_credentials(tls))
        if tls
        else server.add_insecure_port("127.0.0.1:0")
    )
    await server.start()
    return server, servicer, port


async def test_healthcheck_follows_the_serving_status() -> None:
    """Exit 0 while the service is SERVING, 1 once it is NOT_SERVING or gone."""
    server, servicer, port = await _health_server(None)
    env = {"BULKHEAD_STATE_ADDR": f"0.0.0.0:{port}"}  # as in a container: listens on all interfaces
    try:
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert (await _probe("state", env)).returncode == 0
        await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert (await _probe("state", env)).returncode == 1
    finally:
        await server.stop(None)
    gone = await _probe("state", env)
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr


async def test_healthcheck_uses_the_pods_certificate_under_mtls(tmp_path: pathlib.Path) -> None:
    """With BULKHEAD_TLS_* set the probe passes an mTLS server; without them it cannot."""
    write_dev_certs(tmp_path, names=("metering",))
    tls = TlsConfig.from_dir(tmp_path, "metering")
    server, servicer, port = await _health_server(tls)
    env = {"BULKHEAD_METERING_ADDR": f"0.0.0.0:{port}"}
    try:
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert (await _probe("metering", {**env, **tls.as_env()})).returncode == 0
        assert (await _probe("metering", env)).returncode == 1
    finally:
        await server.stop(None)


async def test_healthcheck_rejects_an_unknown_service() -> None:
    """A typo in a probe command is a usage error, not a silent pass."""
    result = await _probe("metring", {})
    assert result.returncode == 64 and "usage" in result.stderr


def test_entrypoint_refuses_unknown_services() -> None:
    """The image runs only the six services; anything else exits 64 with usage."""
    result = subprocess.run(["sh", str(DEPLOY / "entrypoint.sh"), "bash"], check=False, capture_output=True, text=True)
    assert result.returncode == 64 and "usage" in result.stderr


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    """Every COPY source is in the repository and let through by Dockerfile.dockerignore."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    sources = [
        src
        for line in dockerfile.splitlines()
        if line.startswith("COPY ")
        for src in line.split()[1:-1]
        if not src.startswith("--")
    ]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert src.rstrip("/") in allowed, f"COPY {src}: excluded by Dockerfile.dockerignore"
    assert re.search(r"^USER 10001$", dockerfile, re.MULTILINE)  # never runs as root

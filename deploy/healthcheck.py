#!/usr/bin/env python3
"""Container health probe: `bulkhead-healthcheck <service>` exits 0 when the service reports SERVING.

Kubernetes' built-in gRPC probe cannot present a client certificate, so with mTLS on the
probes run this instead; it dials the container's own port with the container's own
certificate (every service certificate is also a client certificate). Without TLS it is a
plain gRPC health check, which is also what compose uses.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.config import SERVICES, service_addr
from shared.tls import TlsConfig, channel_credentials


def probe_target(service: str, env: Mapping[str, str]) -> str:
    """localhost and the port the service listens on (its BULKHEAD_<SVC>_ADDR)."""
    _, _, port = service_addr(service, env).rpartition(":")
    return f"localhost:{port}"


def check(service: str, env: Mapping[str, str], *, timeout: float = 3.0) -> bool:
    """Whether the service's overall health status is SERVING."""
    tls = TlsConfig.from_env(env)
    target = probe_target(service, env)
    channel = (
        grpc.secure_channel(target, channel_credentials(tls)) if tls is not None else grpc.insecure_channel(target)
    )
    with channel:
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(  # type: ignore[attr-defined]  # types-grpcio-health-checking lists no RPCs
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError as exc:
            print(f"{service}: {exc.code().name}", file=sys.stderr)
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: Sequence[str] = sys.argv) -> int:
    """Probe the service named by the first argument; exit status 0 = healthy."""
    if len(argv) != 2 or argv[1] not in SERVICES:
        print(f"usage: bulkhead-healthcheck {'|'.join(SERVICES)}", file=sys.stderr)
        return 64
    return 0 if check(argv[1], os.environ) else 1


if __name__ == "__main__":
    raise SystemExit(main())

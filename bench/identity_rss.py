#!/usr/bin/env python3
"""identity's idle memory: start it on embedded defaults, wait until healthy and settled, print its RSS.

The baseline is a bare Python process importing grpcio only, measured in the same run. With
`--mesh`, also every service of a `bulkhead up` (SQLite, as the e2e tests start it), idle after
settling (target: each <= 100 MB).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._figures import add_json_option, write_json  # noqa: E402
from bulkhead_cli.supervisor import check_health  # noqa: E402


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mesh_idle_rss() -> dict[str, float]:
    """RSS of each process `bulkhead up` starts, once all are healthy and have settled."""
    from tests.e2e.conftest import start_mesh

    with tempfile.TemporaryDirectory() as data:
        mesh = start_mesh(Path(data) / "mesh")
        try:
            time.sleep(5)  # settle: migrations done, background loops started
            return {name: rss_mb(pid) for name, pid in sorted(mesh.service_pids().items())}
        finally:
            mesh.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mesh", action="store_true", help="also every service of `bulkhead up`, idle")
    add_json_option(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data:
        port = free_port()
        env = {
            **os.environ,
            "BULKHEAD_DATA_DIR": data,
            "BULKHEAD_IDENTITY_ADDR": f"127.0.0.1:{port}",
            "BULKHEAD_IDENTITY_METRICS_PORT": "0",
        }
        identity = subprocess.Popen(
            [sys.executable, "-m", "services.identity"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        baseline = subprocess.Popen(
            [sys.executable, "-c", "import grpc, time; time.sleep(60)"], stdout=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 60
            while not asyncio.run(check_health(f"127.0.0.1:{port}")):
                if time.monotonic() > deadline:
                    raise SystemExit("identity did not become healthy")
                time.sleep(0.2)
            time.sleep(3)  # settle: migrations done, revocation poll running
            ident, base = rss_mb(identity.pid), rss_mb(baseline.pid)
        finally:
            identity.terminate()
            baseline.terminate()
    print(f"identity idle RSS: {ident:.1f} MB (target <= 100 MB)")
    print(f"baseline (python + grpcio): {base:.1f} MB; identity/baseline = {ident / base:.2f}x")
    figures = {"identity_idle_rss_mb": ident, "python_grpcio_baseline_rss_mb": base}
    if args.mesh:
        services = mesh_idle_rss()
        for name, mb in services.items():
            print(f"bulkhead up, idle: {name:<13} {mb:6.1f} MB")
        figures |= {f"mesh_{name}_idle_rss_mb": mb for name, mb in services.items()}
        figures["mesh_max_service_idle_rss_mb"] = max(services.values())
    write_json(args.json, figures)


if __name__ == "__main__":
    main()

"""Worker processes of the inference proxy on one port (BULKHEAD_INFERENCE_WORKERS, SO_REUSEPORT).

Light on purpose: the parent that runs the workers imports this and the config only, not the proxy.
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Callable, Mapping, Sequence

from services.inference.config import InferenceConfig
from shared import process

WORKER_ENV = process.worker_env_var("inference")
"""Set (1..N) in the environment of each worker process that serve_workers starts."""


def serve_workers(
    config: InferenceConfig,
    command: Sequence[str],
    *,
    env: Mapping[str, str] = os.environ,
    on_ready: Callable[[str], None] | None = None,
    ready: Callable[[subprocess.Popen], bool] | None = None,
    stdout: int | None = None,
) -> int:
    """Run config.workers processes of `command` serving one port (shared.process.serve_workers).

    Each worker is a whole proxy (its own event loop, leases, holder name, attempt journal replica
    `<replica>-w<i>`)."""

    def replica_of(i: int, address: str) -> dict[str, str]:
        return {"BULKHEAD_INFERENCE_REPLICA_ID": f"{config.replica_id or replica_name(address)}-w{i}"}

    return process.serve_workers(
        "inference",
        config.workers,
        config.service.address,
        command,
        env=env,
        extra_env=replica_of,
        on_ready=on_ready,
        ready=ready,
        stdout=stdout,
        metrics_port=config.service.metrics_port,
    )


def replica_name(address: str) -> str:
    """Host and port; a random port (0) gets a random name, so only the sweeper settles what it leaves."""
    port = address.rsplit(":", 1)[-1]
    return f"{socket.gethostname()}:{port if port != '0' else uuid.uuid4().hex[:12]}"

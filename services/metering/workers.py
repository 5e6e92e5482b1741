"""Worker processes of metering on one port (BULKHEAD_METERING_WORKERS, SO_REUSEPORT).

Light on purpose: the parent that runs the workers imports this and the config only, not the service.

Several workers are several replicas on one host: Postgres arbitrates every hold and settlement (one
conditional statement each), so budgets stay exact and a keyed reservation or a settlement is taken
once whichever worker runs it; each worker keeps its own caches (budget specs, prices) with the
staleness bound replicas already have, and sweeps as a replica does (the guarded UPDATE expires a
hold once however many sweep).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from shared import process

WORKER_ENV = process.worker_env_var("metering")
"""Set (1..N) in the environment of each worker process that serve_workers starts."""


def serve_workers(
    workers: int,
    address: str,
    command: Sequence[str],
    *,
    env: Mapping[str, str] = os.environ,
    metrics_port: int = 0,
) -> int:
    """Run `workers` processes of `command` serving `address`, their metrics summed on `metrics_port`
    (shared.process.serve_workers)."""
    return process.serve_workers("metering", workers, address, command, env=env, metrics_port=metrics_port)

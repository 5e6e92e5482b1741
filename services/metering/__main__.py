"""Run the metering service: `python -m services.metering` (BULKHEAD_METERING_WORKERS > 1: that many, on one port)."""

from __future__ import annotations

import os
import sys

from services.metering.config import MeteringConfig
from services.metering.workers import WORKER_ENV, serve_workers

config = MeteringConfig.from_env()
if config.workers > 1 and WORKER_ENV not in os.environ:
    # The parent only watches its workers: it never loads the service itself.
    sys.exit(
        serve_workers(
            config.workers,
            config.service.address,
            [sys.executable, "-m", "services.metering"],
            metrics_port=config.service.metrics_port,
        )
    )

from services.metering.server import main  # noqa: E402 - a worker, or the one process: the parent never loads it
from shared.process import run_loop  # noqa: E402

run_loop(main)

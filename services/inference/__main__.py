"""Run the inference proxy: python -m services.inference (BULKHEAD_INFERENCE_WORKERS > 1: that many, on one port)."""

from __future__ import annotations

import os
import sys

from services.inference.config import InferenceConfig
from services.inference.workers import WORKER_ENV, serve_workers

config = InferenceConfig.from_env()
if config.workers > 1 and WORKER_ENV not in os.environ:
    # The parent only watches its workers: it never loads the proxy itself.
    sys.exit(serve_workers(config, [sys.executable, "-m", "services.inference"]))

from services.inference.server import main  # noqa: E402 - a worker, or the one process: the parent never loads it
from shared.process import run_loop  # noqa: E402

run_loop(main)

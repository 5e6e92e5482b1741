"""Run the state service: python -m services.state."""

from __future__ import annotations

from services.state.server import main
from shared.process import run_loop

run_loop(main)

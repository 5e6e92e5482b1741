"""Run the inference proxy: python -m services.inference."""
from __future__ import annotations

from services.inference.server import run

run()

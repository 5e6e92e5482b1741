"""shared.db loads Alembic's Mako without Pygments (idle memory), and leaves Pygments importable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

PROBE = """
import sys
import shared.db  # loads Alembic, and Alembic loads Mako
print("pygments" in sys.modules, sys.modules["mako.exceptions"].pygments_html_formatter is None)
import pygments  # hidden only while Mako loaded
print(pygments.__name__)
"""


def test_importing_shared_db_leaves_pygments_unloaded_but_importable() -> None:
    pytest.importorskip("pygments")  # without it there is nothing to keep out
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    probe = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True, env=env)
    out = probe.stdout.split()
    assert out == ["False", "True", "pygments"]

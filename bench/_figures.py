"""The one way every bench script hands its figures to bench/all.py: `--json FILE`.

A figure is a name (its unit at the end: `_ms`, `_per_s`, `_mb`, `_ratio`) and a number. A
script writes a flat object of them; all.py prefixes each name with the script's name.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
from collections.abc import Mapping


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """Add `--json FILE` to a bench script's parser."""
    parser.add_argument("--json", metavar="FILE", help="also write this run's figures to FILE (for bench/all.py)")


def write_json(path: str | None, figures: Mapping[str, float | None]) -> None:
    """Write `figures` to `path` (no-op without --json); a NaN or missing figure is written as null."""
    if not path:
        return
    clean = {
        name: (
            None if value is None or (isinstance(value, float) and not math.isfinite(value)) else round(float(value), 4)
        )
        for name, value in figures.items()
    }
    pathlib.Path(path).write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")

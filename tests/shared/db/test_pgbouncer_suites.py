"""A service's own Postgres tests, run again with every runtime connection through PgBouncer.

One CI session cannot switch its `postgres` fixture to the pooler halfway, so this runs metering's
Postgres tests (the raw-SQL budget hot path under concurrency, and the store) in a child pytest
with BULKHEAD_TEST_PGBOUNCER=1. Run any other suite the same way by hand:
`BULKHEAD_TEST_PGBOUNCER=1 scripts/test tests/services/<svc> -m postgres`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.postgres, pytest.mark.pgbouncer, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]
SUITES = ["tests/services/metering/test_budget_sql.py", "tests/services/metering/test_postgres.py"]


def test_metering_postgres_tests_pass_through_pgbouncer() -> None:
    """Metering's Postgres tests pass when the service's runtime role goes through PgBouncer."""
    env = {**os.environ, "BULKHEAD_TEST_PGBOUNCER": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "postgres",
            "-o",
            "faulthandler_timeout=120",
            *SUITES,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert re.search(r"^pgbouncer: PgBouncer [\d.]+, transaction pooling", out, re.M), out[-2000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 10, out[-2000:]

"""The pgbouncer fixture: transaction pooling in front of the session's Postgres, stopped with the
session, and a failure (never a skip) with an install hint when the binary is missing."""

from __future__ import annotations

import pathlib
import re
import subprocess

import asyncpg

from testkit.procs import port_accepts
from tests.testkit.test_fixtures_plugin import run_inner

ROOT = pathlib.Path(__file__).resolve().parents[2]

_INNER_TESTS = '''
def test_wants_pgbouncer(pgbouncer):
    """Report the port."""
    print("PGBOUNCER_PORT", pgbouncer.port)

def test_create_database_goes_through_it(postgres):
    """Under BULKHEAD_TEST_PGBOUNCER=1 the runtime URL names PgBouncer's port."""
    urls = postgres.create_database_sync("inner")
    print("APP_URL_PORT", urls.app_url.rsplit(":", 1)[1].split("/")[0], "SCHEME", urls.app_url.split("://")[0])
    print("POOLER_PORT", postgres.pooler.port if postgres.pooler else None)
'''


def _run_inner(tmp_path: pathlib.Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    return run_inner(tmp_path, _INNER_TESTS, env_extra, "-s")


def test_missing_pgbouncer_fails_with_install_hint_not_skip(tmp_path: pathlib.Path) -> None:
    """Without the binary, the test that needs PgBouncer errors out saying how to install it."""
    done = _run_inner(tmp_path, {"BULKHEAD_TEST_PGBOUNCER_BIN": "/nonexistent/pgbouncer"})
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "apt-get install -y --no-install-recommends pgbouncer" in out, out
    assert "1 passed" in out and "1 error" in out, out
    assert "skipped" not in out


def test_env_routes_runtime_urls_through_pgbouncer_which_stops_with_the_session(tmp_path: pathlib.Path) -> None:
    """BULKHEAD_TEST_PGBOUNCER=1: app_url is postgresql+pgbouncer on the pooler's port; after the session
    nothing listens there any more."""
    done = _run_inner(tmp_path, {"BULKHEAD_TEST_PGBOUNCER": "1"})
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    port = int(re.search(r"PGBOUNCER_PORT (\d+)", out).group(1))
    assert re.search(rf"APP_URL_PORT {port} SCHEME postgresql\+pgbouncer", out), out
    assert f"POOLER_PORT {port}" in out
    assert "transaction pooling" in out
    assert not port_accepts("127.0.0.1", port)


async def test_pool_mode_is_transaction(pgbouncer) -> None:
    """Two clients connected at once take turns on one server connection: pooling per transaction."""
    first, second = [await asyncpg.connect(pgbouncer.admin_dsn(), statement_cache_size=0) for _ in range(2)]
    try:
        pids = []
        for conn in (first, second):
            async with conn.transaction():
                pids.append(await conn.fetchval("SELECT pg_backend_pid()"))
    finally:
        await first.close()
        await second.close()
    assert pids[0] == pids[1]  # in session mode the second client would need a backend of its own

"""pytest plugin: real PostgreSQL and OpenBao servers, started lazily, once per test session.

Load it from tests/conftest.py with `pytest_plugins = ["testkit.fixtures"]`.

- `postgres` -> PostgresServer: `.admin_url`, `.admin_dsn`, `await .create_database(name)`.
- `openbao`  -> OpenBaoServer: `.url`, `.root_token`, `.client()`, `.stop()`, `.start()`.
- `pgbouncer` -> PgBouncer in transaction pooling mode in front of `postgres`: `.app_url(db)`,
  `.app_dsn(db)`. With BULKHEAD_TEST_PGBOUNCER=1 every `create_database` hands out runtime URLs
  through it, so the Postgres tests run through the pooler.
- `openbao_raft` -> OpenBaoRaftCluster: 3 OpenBao nodes on Raft, fresh for each test (failover
  tests kill nodes): `.urls`, `.wait_for_leader()`, `.restart(node)`, `.client()`.
- `postgres_replica` -> PostgresPair: a primary of its own with a synchronous streaming standby,
  fresh for each test (failover tests stop the primary): `.primary.create_database(name)`,
  `.multi_host_url(url)`, `.stop_primary()`, `.promote()`.

A server starts only when the first test asks for it. When it cannot start (binary missing,
no Docker engine) the tests that need it FAIL with a message saying what to install: they are
never skipped, so CI cannot go green without them. Tests using a fixture get the matching
marker automatically, so `pytest -m "not postgres and not openbao"` runs the rest.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from testkit.openbao import OpenBaoServer, start_openbao
from testkit.openbao_raft import OpenBaoRaftCluster, start_openbao_raft
from testkit.pgbouncer import PgBouncer, start_pgbouncer
from testkit.postgres import PostgresServer, start_postgres
from testkit.postgres_replica import PostgresPair, start_postgres_pair
from testkit.procs import ServerStartError, free_port

__all__ = ["free_port", "openbao", "openbao_raft", "pgbouncer", "postgres", "postgres_replica"]

_started: list[str] = []
_openbao: list[OpenBaoServer] = []


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers (also declared in pyproject.toml; repeating them is harmless)."""
    config.addinivalue_line("markers", "postgres: needs the throwaway PostgreSQL server")
    config.addinivalue_line("markers", "openbao: needs the OpenBao dev server")
    config.addinivalue_line("markers", "pgbouncer: needs PgBouncer in front of the PostgreSQL server")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a server fixture, directly or through another fixture."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        for marker in ("postgres", "openbao", "pgbouncer"):
            if marker in names:
                item.add_marker(getattr(pytest.mark, marker))


def pytest_terminal_summary(terminalreporter) -> None:
    """Say which throwaway servers this session used."""
    for line in _started:
        terminalreporter.write_line(line)


def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Bring OpenBao back if a test stopped it and failed before restarting it."""
    for server in _openbao:
        if not server.running:
            server.start()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server for the session (local binaries or testcontainers)."""
    try:
        server = start_postgres()
    except ServerStartError as exc:
        pytest.fail(f"cannot start PostgreSQL for the tests: {exc}", pytrace=False)
    _started.append(f"postgres: {server.backend} server on {server.host}:{server.port}")
    try:
        if os.environ.get("BULKHEAD_TEST_PGBOUNCER") == "1":
            server.pooler = _start_pgbouncer(server)
        yield server
    finally:
        if server.pooler is not None:
            server.pooler.stop()
        server.stop()


def _start_pgbouncer(server: PostgresServer) -> PgBouncer:
    try:
        bouncer = start_pgbouncer(server)
    except ServerStartError as exc:
        pytest.fail(f"cannot start PgBouncer for the tests: {exc}", pytrace=False)
    _started.append(f"pgbouncer: {bouncer.version}, transaction pooling on {bouncer.host}:{bouncer.port}")
    return bouncer


@pytest.fixture(scope="session")
def pgbouncer(postgres: PostgresServer) -> Iterator[PgBouncer]:
    """PgBouncer (transaction pooling) in front of the session's Postgres, for the session.

    The one create_database routes through under BULKHEAD_TEST_PGBOUNCER=1, else a private one
    (so asking for it never reroutes other tests' databases).
    """
    if postgres.pooler is not None:
        yield postgres.pooler
        return
    bouncer = _start_pgbouncer(postgres)
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture(scope="session")
def openbao() -> Iterator[OpenBaoServer]:
    """A throwaway OpenBao dev server for the session (empty again after stop()/start())."""
    try:
        server = start_openbao()
    except ServerStartError as exc:
        pytest.fail(f"cannot start OpenBao for the tests: {exc}", pytrace=False)
    _started.append(f"openbao: dev server on {server.url}")
    _openbao.append(server)
    try:
        yield server
    finally:
        _openbao.remove(server)
        server.close()


@pytest.fixture
def openbao_raft() -> Iterator[OpenBaoRaftCluster]:
    """A fresh 3-node OpenBao Raft cluster for one test (about 10 s to start), stopped after it."""
    try:
        cluster = start_openbao_raft()
    except ServerStartError as exc:
        pytest.fail(f"cannot start the OpenBao Raft cluster for the tests: {exc}", pytrace=False)
    _started.append(f"openbao_raft: 3 nodes on {', '.join(cluster.urls)}")
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def postgres_replica() -> Iterator[PostgresPair]:
    """A fresh primary + synchronous streaming standby for one test (a few seconds), stopped after it."""
    try:
        pair = start_postgres_pair()
    except ServerStartError as exc:
        pytest.fail(f"cannot start the Postgres primary and standby for the tests: {exc}", pytrace=False)
    _started.append(
        f"postgres_replica: primary on 127.0.0.1:{pair.primary_port}, standby on 127.0.0.1:{pair.standby_port}"
    )
    try:
        yield pair
    finally:
        pair.close()

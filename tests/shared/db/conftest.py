"""Fixtures for the DB layer's tests: the notes schema on SQLite and on the throwaway Postgres."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from shared.db import Database
from shared.tenancy import TenantContext

MIGRATIONS = Path(__file__).parent / "migrations"


def as_tenant(tenant_id: str, tier: str = "pooled") -> TenantContext:
    """A TenantContext for `tenant_id` (what the server interceptor would set)."""
    return TenantContext(tenant_id=tenant_id, principal_id="p_test", scopes=frozenset({"*"}), tier=tier)


@pytest.fixture
async def sqlite_db(tmp_path: Path) -> AsyncIterator[Database]:
    """The notes schema, migrated, in an SQLite file."""
    db = await Database.open(f"sqlite:///{tmp_path}/data/notes.db", migrations=MIGRATIONS)
    yield db
    await db.close()


@pytest.fixture(scope="module")
def pg_urls(postgres):
    """A Postgres database per test module, owned by its own role; `bulkhead_app` is the runtime role."""
    return postgres.create_database_sync("dbtest")


async def open_emptied(app_url: str, pg_urls) -> Database:
    db = await Database.open(app_url, owner_url=pg_urls.owner_url, migrations=MIGRATIONS)
    conn = await asyncpg.connect(pg_urls.owner_dsn)
    try:  # TRUNCATE is not subject to RLS: a clean slate for every test
        await conn.execute("TRUNCATE notes, settings RESTART IDENTITY")
    finally:
        await conn.close()
    return db


@pytest.fixture
async def pg_db(pg_urls) -> AsyncIterator[Database]:
    """The notes schema migrated as the owner, emptied, opened as the runtime role (RLS applies)."""
    db = await open_emptied(pg_urls.app_url, pg_urls)
    yield db
    await db.close()


@pytest.fixture
async def pgbouncer_db(pg_urls, pgbouncer) -> AsyncIterator[Database]:
    """pg_db with the runtime role's connections going through PgBouncer in transaction pooling."""
    db = await open_emptied(pgbouncer.app_url(pg_urls.name), pg_urls)
    yield db
    await db.close()


_FIXTURE = {"sqlite": "sqlite_db", "postgres": "pg_db", "pgbouncer": "pgbouncer_db"}


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("pgbouncer", marks=[pytest.mark.postgres, pytest.mark.pgbouncer]),
    ]
)
def db(request: pytest.FixtureRequest) -> Database:
    """The notes database on each backend, and on Postgres through PgBouncer."""
    return request.getfixturevalue(_FIXTURE[request.param])

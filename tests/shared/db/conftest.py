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


@pytest.fixture
async def pg_db(pg_urls) -> AsyncIterator[Database]:
    """The notes schema migrated as the owner, emptied, opened as the runtime role (RLS applies)."""
    db = await Database.open(pg_urls.app_url, owner_url=pg_urls.owner_url, migrations=MIGRATIONS)
    conn = await asyncpg.connect(pg_urls.owner_dsn)
    try:  # TRUNCATE is not subject to RLS: a clean slate for every test
        await conn.execute("TRUNCATE notes, settings RESTART IDENTITY")
    finally:
        await conn.close()
    yield db
    await db.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest) -> Database:
    """The notes database on each backend."""
    return request.getfixturevalue("sqlite_db" if request.param == "sqlite" else "pg_db")

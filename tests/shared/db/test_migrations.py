"""Migrations: per-service version table, idempotent upgrades, bad input refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from shared.db import Database, upgrade
from shared.db.migrations import version_table_for

from .conftest import MIGRATIONS
from .notes import Setting


async def test_sqlite_migration_uses_a_per_service_version_table(sqlite_db: Database) -> None:
    """Tables are created and the version lives in alembic_version_<service>, not alembic_version."""
    async with sqlite_db.engine.connect() as conn:
        tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
    assert {"notes", "settings", "alembic_version_db"} <= tables
    assert "alembic_version" not in tables


async def test_reopening_a_migrated_database_is_a_no_op(tmp_path: Path) -> None:
    """Opening again re-runs nothing: the data stays and the version table still has one row."""
    url = f"sqlite:///{tmp_path}/n.db"
    db = await Database.open(url, migrations=MIGRATIONS)
    async with db.system_session() as s:
        s.add(Setting(key="k", value="v"))
    await db.close()
    db = await Database.open(url, migrations=MIGRATIONS)
    try:
        async with db.system_session() as s:
            assert (await s.get(Setting, "k")).value == "v"
            versions = (await s.execute(text("SELECT version_num FROM alembic_version_db"))).scalars().all()
    finally:
        await db.close()
    assert versions == ["0001"]


def test_version_table_is_named_after_the_service_folder() -> None:
    """services/credentials/migrations keeps its version in alembic_version_credentials."""
    assert version_table_for("services/credentials/migrations") == "alembic_version_credentials"


def test_bad_schema_name_and_missing_folder_are_refused(tmp_path: Path) -> None:
    """upgrade() refuses unsafe schema names and folders without env.py."""
    with pytest.raises(ValueError):
        upgrade(f"sqlite:///{tmp_path}/x.db", MIGRATIONS, schema="evil; drop")
    with pytest.raises(FileNotFoundError):
        upgrade(f"sqlite:///{tmp_path}/x.db", tmp_path)


async def test_in_memory_sqlite_is_refused() -> None:
    """An in-memory SQLite database would be a different one per connection: refused."""
    with pytest.raises(ValueError, match="file path"):
        await Database.open("sqlite://", migrations=MIGRATIONS)


async def test_sqlite_runs_in_wal_mode_with_foreign_keys(sqlite_db: Database, tmp_path: Path) -> None:
    """The embedded database uses WAL and enforces foreign keys; its directory was created."""
    async with sqlite_db.engine.connect() as conn:
        assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
        assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar() == 1
    assert (tmp_path / "data" / "notes.db").is_file()


_GRANTING_MIGRATION = """
import sqlalchemy as sa
from alembic import op

from shared.db.rls import grant_app_role

revision = "g1"
down_revision = None


def upgrade() -> None:
    op.create_table("things", sa.Column("id", sa.Integer, primary_key=True))
    grant_app_role()
"""


@pytest.mark.postgres
async def test_grant_app_role_grants_dml_only_to_the_configured_role(postgres, tmp_path: Path, monkeypatch) -> None:
    """grant_app_role() in a migration gives BULKHEAD_DB_APP_ROLE DML (no TRUNCATE, no ownership)."""
    import asyncpg

    urls = await postgres.create_database("grants")
    admin = await asyncpg.connect(postgres.admin_dsn)
    try:
        await admin.execute("DROP ROLE IF EXISTS grantee_test")
        await admin.execute("CREATE ROLE grantee_test NOLOGIN")
    finally:
        await admin.close()
    folder = tmp_path / "svc" / "migrations"
    (folder / "versions").mkdir(parents=True)
    (folder / "env.py").write_text((MIGRATIONS / "env.py").read_text())
    (folder / "script.py.mako").write_text((MIGRATIONS / "script.py.mako").read_text())
    (folder / "versions" / "g1.py").write_text(_GRANTING_MIGRATION)
    monkeypatch.setenv("BULKHEAD_DB_APP_ROLE", "grantee_test")
    upgrade(urls.owner_url, folder)
    conn = await asyncpg.connect(urls.owner_dsn)
    try:
        privileges = {
            p: await conn.fetchval("SELECT has_table_privilege('grantee_test', 'things', $1)", p)
            for p in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE")
        }
        owner = await conn.fetchval("SELECT relowner::regrole::text FROM pg_class WHERE relname = 'things'")
        version_table = await conn.fetchval("SELECT to_regclass('alembic_version_svc')::text")
    finally:
        await conn.close()
    assert privileges == {"SELECT": True, "INSERT": True, "UPDATE": True, "DELETE": True, "TRUNCATE": False}
    assert owner == urls.owner_role
    assert version_table == "alembic_version_svc"

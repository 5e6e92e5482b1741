"""The Alembic migrations build exactly the tables, keys and indexes the models declare."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from services.state.server import MIGRATIONS
from services.state.store import StateBase
from shared.db.migrations import version_table_for


def _state_only(obj, name, type_, reflected, compare_to) -> bool:
    """Leave out the shared tables every service's database also holds (shared.settings, the
    security-events ledger) and their version tables: they have migrations of their own."""
    table = name if type_ == "table" else getattr(getattr(obj, "table", None), "name", "")
    return not (table or "").startswith(("bulkhead_", "alembic_version_"))


def _diff(connection) -> list:
    context = MigrationContext.configure(
        connection, opts={"version_table": version_table_for(MIGRATIONS), "include_object": _state_only}
    )
    return compare_metadata(context, StateBase.metadata)


async def test_migrated_sqlite_matches_the_models(sqlite_template):
    """No difference between the migrated SQLite schema and store.py."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{sqlite_template}")
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
    finally:
        await engine.dispose()


async def test_migrated_postgres_matches_the_models_and_enables_rls(pg_state):
    """On Postgres too; and every state table has FORCE row-level security with the tenant policy."""
    async with pg_state.db.engine.connect() as conn:
        assert await conn.run_sync(_diff) == []
        tables = await conn.run_sync(lambda c: inspect(c).get_table_names())
    rows = await pg_state.raw(
        "SELECT relname, relrowsecurity, relforcerowsecurity FROM pg_class "
        "WHERE relname LIKE 'state_%' AND relkind = 'r'"
    )
    assert {r[0] for r in rows} == {t for t in tables if t.startswith("state_")} == set(StateBase.metadata.tables)
    assert all(r[1] and r[2] for r in rows)
    policies = await pg_state.raw("SELECT tablename FROM pg_policies WHERE policyname = 'tenant_isolation'")
    assert {p[0] for p in policies if p[0].startswith("state_")} == set(StateBase.metadata.tables)

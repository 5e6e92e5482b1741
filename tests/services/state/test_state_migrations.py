"""State's migrations on Postgres enable row-level security on every state table. (That they build
exactly the tables, keys and indexes the models declare is tests/shared/db/test_service_migrations.py.)"""

from __future__ import annotations

from sqlalchemy import inspect

from services.state.store import StateBase


async def test_migrated_postgres_enables_rls_on_every_state_table(pg_state):
    """Every state table has FORCE row-level security with the tenant policy."""
    async with pg_state.db.engine.connect() as conn:
        tables = await conn.run_sync(lambda c: inspect(c).get_table_names())
    rows = await pg_state.raw(
        "SELECT relname, relrowsecurity, relforcerowsecurity FROM pg_class "
        "WHERE relname LIKE 'state_%' AND relkind = 'r'"
    )
    assert {r[0] for r in rows} == {t for t in tables if t.startswith("state_")} == set(StateBase.metadata.tables)
    assert all(r[1] and r[2] for r in rows)
    policies = await pg_state.raw("SELECT tablename FROM pg_policies WHERE policyname = 'tenant_isolation'")
    assert {p[0] for p in policies if p[0].startswith("state_")} == set(StateBase.metadata.tables)

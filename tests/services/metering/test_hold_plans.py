"""The hot path's hold look-ups stay index look-ups by (tenant, hold id) on a table without statistics.

PL/pgSQL keeps a function's plan for the connection's life, made the first time it runs: on a fresh
database, bridge schema or silo database that is before autovacuum has analyzed anything. A plan that
finds the hold through a tenant-only index then walks every hold of the tenant on each settle.
"""

from __future__ import annotations

import asyncpg

A = "t_alpha"

# What metering_settle (migration 0008) and budget_sql's get_hold look a hold up by.
_LOOKUP = """UPDATE metering_holds SET settled_us = 1
WHERE tenant_id = $1 AND hold_id = $2 AND kind = $3 AND state || '' = 'open'"""


async def _generic_plan(dsn: str, sql: str, *types: str) -> str:
    """The generic plan (what a PL/pgSQL function caches) of sql as the runtime role, on the tables as they are."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.tenant_id', $1, true)", A)
            await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            await conn.execute(f"PREPARE lookup({', '.join(types)}) AS {sql}")
            rows = await conn.fetch("EXPLAIN EXECUTE lookup('t_alpha', 'res_x', 'reservation')")
            await conn.execute("DEALLOCATE lookup")
        return "\n".join(r[0] for r in rows)
    finally:
        await conn.close()


async def test_a_hold_is_found_by_tenant_and_id_before_any_statistics(pg_metering):
    """On a never-analyzed holds table the settle's look-up has both the tenant and the hold id in its index
    condition: one index probe, however many holds the tenant has."""
    plan = await _generic_plan(pg_metering.urls.app_dsn, _LOOKUP, "text", "text", "text")
    probe = next(line for line in plan.splitlines() if "Index Cond" in line)
    assert "tenant_id" in probe and "hold_id" in probe, plan

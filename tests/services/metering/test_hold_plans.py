"""The hot path's hold look-ups stay single index probes on a table without statistics.

PL/pgSQL keeps a function's plan for the connection's life, made the first times it runs: on a fresh
database, bridge schema or silo database that is before autovacuum has analyzed anything, when the
planner cannot tell an index's tenant_id prefix from a probe for one hold. A plan that finds the hold
through a tenant-only prefix walks every hold of the tenant on each settle (migration 0009).
"""

from __future__ import annotations

import asyncpg
import pytest

A = "t_alpha"
HOLDS = 400

_RESERVE = "SELECT * FROM metering_reserve(" + ", ".join(f"${i}" for i in range(1, 22)) + ")"

# What metering_settle (migration 0008) and budget_sql's get_hold find a hold by, and what metering_reserve
# finds a keyed reservation by; with the columns the index probe must fix.
_LOOKUPS = {
    "settle": (
        "UPDATE metering_holds SET settled_us = 1 WHERE tenant_id = $1 AND hold_id = $2 AND kind = 'reservation'"
        " AND state || '' = 'open'",
        ("tenant_id", "hold_id"),
    ),
    "key": (
        "SELECT hold_id FROM metering_holds WHERE tenant_id = $1 AND idempotency_key = $2",
        ("tenant_id", "idempotency_key"),
    ),
}


async def _with_holds(dsn: str) -> asyncpg.Connection:
    """A runtime-role connection, after HOLDS reservations of tenant A (every other one keyed) on a fresh table."""
    conn = await asyncpg.connect(dsn)
    for i in range(HOLDS):
        key = f"key-{i}" if i % 2 else None
        await conn.fetch(
            _RESERVE, A, 1, 10, None, None, 1, 0, None, None, f"res_{i:04d}", "reservation", "m", key, 0, 0, 0, 0, 0,
            1, 10**15, "",
        )  # fmt: skip
    return conn


async def _plans(conn: asyncpg.Connection, sql: str) -> str:
    """The custom and the generic plan (PL/pgSQL uses one, then maybe the other) of sql as tenant A."""
    found = []
    for mode in ("force_custom_plan", "force_generic_plan"):
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.tenant_id', $1, true)", A)
            await conn.execute(f"SET LOCAL plan_cache_mode = {mode}")
            await conn.execute(f"PREPARE lookup(text, text) AS {sql}")
            found += [r[0] for r in await conn.fetch("EXPLAIN EXECUTE lookup('t_alpha', 'res_0100')")]
            await conn.execute("DEALLOCATE lookup")
    return "\n".join(found)


@pytest.mark.parametrize("lookup", sorted(_LOOKUPS))
async def test_a_hold_is_one_index_probe_before_any_statistics(pg_metering, lookup):
    """On a never-analyzed holds table with hundreds of the tenant's holds, each plan's index condition fixes
    the tenant and the hold (or its key): one probe, however many holds the tenant has."""
    sql, columns = _LOOKUPS[lookup]
    conn = await _with_holds(pg_metering.urls.app_dsn)
    try:
        plan = await _plans(conn, sql)
    finally:
        await conn.close()
    probes = [line for line in plan.splitlines() if "Index Cond" in line]
    assert len(probes) == 2 and all(c in p for p in probes for c in columns), plan


async def _holds_read(conn: asyncpg.Connection) -> int:
    """Index entries read from metering_holds so far, as the statistics of this connection's own work show them."""
    await conn.execute("SELECT pg_stat_force_next_flush()")
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return await conn.fetchval(
        "SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes WHERE relname = 'metering_holds'"
    )


async def test_a_group_of_settlements_probes_each_hold_once(pg_metering):
    """metering_settle_many on a never-analyzed table with hundreds of the tenant's holds reads about one index
    entry per hold it settles, not the tenant's whole set of holds."""
    conn = await _with_holds(pg_metering.urls.app_dsn)
    try:
        group = [f"res_{i:04d}" for i in range(0, HOLDS, 20)]
        n = len(group)
        before = await _holds_read(conn)
        rows = await conn.fetch(
            "SELECT * FROM metering_settle_many($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            A, "reservation", group, ["committed"] * n, [2] * n, [5] * n, [0] * n, [0] * n, [0] * n, [5] * n,
        )  # fmt: skip
        read = await _holds_read(conn) - before
    finally:
        await conn.close()
    assert sorted(r[0] for r in rows) == group
    assert read <= 2 * n, f"{read} index entries read to settle {n} holds"

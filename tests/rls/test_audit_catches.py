"""The conformance audit can fail: each way of opening a bypass, made on purpose in a throwaway
database (the state service, migrated), is reported naming the table, function, view or role."""

from __future__ import annotations

import asyncpg
import pytest

from shared.db.rls import tenant_rls_statements

from .audit import audit, role_problems
from .conftest import migrate_everywhere
from .test_conformance import CROSS_TENANT_TABLES, PLATFORM_TABLES

pytestmark = pytest.mark.postgres

T = "state_events"
_RESTORE_POLICY = "; ".join(tenant_rls_statements(T))

# (what is broken, SQL that breaks it, SQL that repairs it, what the audit must say)
MUTATIONS = [
    (
        "FORCE off",
        f"ALTER TABLE {T} NO FORCE ROW LEVEL SECURITY",
        f"ALTER TABLE {T} FORCE ROW LEVEL SECURITY",
        [f"{T}: row level security is not FORCEd"],
    ),
    (
        "RLS off",
        f"ALTER TABLE {T} DISABLE ROW LEVEL SECURITY",
        f"ALTER TABLE {T} ENABLE ROW LEVEL SECURITY",
        [
            f"{T}: row level security is not enabled",
            f"{T}: bulkhead_app reads 1 row(s) with no tenant set",
            f"{T}: another tenant reads 1 row(s)",
        ],
    ),
    (
        "a second, open policy",
        f"CREATE POLICY open_door ON {T} USING (true)",
        f"DROP POLICY open_door ON {T}",
        [
            f"{T}: policy open_door (qual) does not use app.tenant_id",
            f"{T}: bulkhead_app reads 1 row(s) with no tenant",
        ],
    ),
    (
        "a policy open while no tenant is set",
        f"DROP POLICY tenant_isolation ON {T}; CREATE POLICY tenant_isolation ON {T} USING "
        f"(current_setting('app.tenant_id', true) IS NULL OR tenant_id = current_setting('app.tenant_id', true))",
        _RESTORE_POLICY,
        [f"{T}: bulkhead_app reads 1 row(s) with no tenant set"],
    ),
    (
        "no policy",
        f"DROP POLICY tenant_isolation ON {T}",
        _RESTORE_POLICY,
        [f"{T}: no policy", f"{T}: the owner cannot write a row as its tenant"],
    ),
    (
        "TRUNCATE granted",
        f"GRANT TRUNCATE ON {T} TO bulkhead_app",
        f"REVOKE TRUNCATE ON {T} FROM bulkhead_app",
        [f"{T}: bulkhead_app may TRUNCATE it"],
    ),
    (
        "the app role owns a table",
        f"ALTER TABLE {T} OWNER TO bulkhead_app",
        f"ALTER TABLE {T} OWNER TO {{owner}}; GRANT SELECT, INSERT, UPDATE, DELETE ON {T} TO bulkhead_app",
        [f"bulkhead_app owns public.{T}"],
    ),
    (
        "an unclassified table",
        "CREATE TABLE state_sneaky (id int)",
        "DROP TABLE state_sneaky",
        ["state/pooled.state_sneaky: no tenant_id column and not classified"],
    ),
    (
        "a SECURITY DEFINER function",
        f"CREATE FUNCTION peek() RETURNS bigint LANGUAGE sql SECURITY DEFINER AS 'SELECT count(*) FROM {T}'",
        "DROP FUNCTION peek()",
        ["function peek() is SECURITY DEFINER"],
    ),
    (
        "a view without security_invoker",
        f"CREATE VIEW all_events AS SELECT * FROM {T}",
        "DROP VIEW all_events",
        ["view all_events lacks security_invoker=true"],
    ),
    (
        "a materialized view",
        f"CREATE MATERIALIZED VIEW frozen AS SELECT * FROM {T}",
        "DROP MATERIALIZED VIEW frozen",
        ["materialized view frozen"],
    ),
]


async def _admin(target, sql: str) -> None:
    conn = await asyncpg.connect(target.admin_dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def test_each_bypass_made_on_purpose_is_reported(postgres) -> None:
    """Baseline clean; then each mutation alone yields its own problem(s); a security_invoker view does not."""
    target = (await migrate_everywhere(postgres, "state", name="rls_mutant"))[0]  # the pooled schema
    lists = {"platform": PLATFORM_TABLES["state"], "cross_tenant": CROSS_TENANT_TABLES.get("state", {})}
    owner = target.owner_dsn.split("://", 1)[1].split(":", 1)[0]
    assert await audit(target, **lists) == []
    missed = []
    for what, breaks, repairs, expected in MUTATIONS:
        await _admin(target, breaks)
        try:
            problems = await audit(target, **lists)
        finally:
            await _admin(target, repairs.format(owner=owner))
        if not all(any(e in p for p in problems) for e in expected):
            missed.append(f"{what}: expected {expected}, got {problems}")
    assert not missed, "\n".join(missed)
    await _admin(target, f"CREATE VIEW own_events WITH (security_invoker = true) AS SELECT * FROM {T}")
    assert await audit(target, **lists) == []


async def test_role_checks_catch_bypassrls_superuser_and_owner_membership(postgres) -> None:
    """A runtime role with BYPASSRLS, SUPERUSER, or membership in a table owner is reported."""
    target = (await migrate_everywhere(postgres, "state", name="rls_roles"))[0]
    owner = target.owner_dsn.split("://", 1)[1].split(":", 1)[0]
    conn = await asyncpg.connect(target.admin_dsn)
    try:
        await conn.execute("DROP ROLE IF EXISTS rls_probe_app")
        await conn.execute("CREATE ROLE rls_probe_app NOLOGIN")
        assert await role_problems(conn, "rls_probe_app") == []
        await conn.execute("ALTER ROLE rls_probe_app BYPASSRLS")
        assert await role_problems(conn, "rls_probe_app") == ["rls_probe_app has BYPASSRLS"]
        await conn.execute("ALTER ROLE rls_probe_app NOBYPASSRLS SUPERUSER")
        assert "rls_probe_app is a superuser" in await role_problems(conn, "rls_probe_app")
        await conn.execute(f'ALTER ROLE rls_probe_app NOSUPERUSER; GRANT "{owner}" TO rls_probe_app')
        assert await role_problems(conn, "rls_probe_app") == [
            f"rls_probe_app is a member of {owner}, which owns tables"
        ]
    finally:
        await conn.execute("DROP ROLE IF EXISTS rls_probe_app")
        await conn.close()

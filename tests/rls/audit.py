"""The RLS conformance audit of one migrated schema: catalog checks plus a probe row per tenant table.

Every function returns a list of problems (strings naming the table, function or role), so one
run reports them all, and tests/rls/test_audit_catches.py can show each check failing on purpose.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import asyncpg

PROBE_TENANT = "t_rls_probe"
OTHER_TENANT = "t_rls_other"
TENANT_RULE = "current_setting('app.tenant_id'"
"""How a policy expression names the tenant (pg_get_expr spells the call this way)."""

# A literal each column type accepts, by pg_type.typcategory (typname for the 'U'ser types).
_LITERALS = {"S": "p", "N": "1", "B": "false", "D": "2026-01-01", "T": "1 day", "I": "127.0.0.1"}
_USER_LITERALS = {"bytea": "p", "json": "{}", "jsonb": "{}", "uuid": "00000000-0000-0000-0000-000000000001"}


@dataclass(frozen=True)
class Target:
    """One migrated schema of one service: the main database's public schema, a bridge schema, a silo database."""

    service: str
    """The service whose migrations built it."""
    where: str
    """How problems name it, e.g. `state/bridge`."""
    schema: str
    """The schema holding the service's tables."""
    admin_dsn: str
    """Superuser DSN of the database (catalog reads)."""
    owner_dsn: str
    """The tables' owner (writes the probe rows, under FORCE'd RLS like everyone)."""
    app_dsn: str
    """The runtime role (what the service runs as)."""
    app_role: str
    """The runtime role's name."""


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def tables(conn: asyncpg.Connection, schema: str) -> dict[str, bool]:
    """Every table of `schema` → whether it has a tenant_id column."""
    rows = await conn.fetch(
        "SELECT c.relname, EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 "
        "  AND NOT a.attisdropped AND a.attname = 'tenant_id') AS tenant "
        "FROM pg_class c WHERE c.relnamespace = $1::regnamespace AND c.relkind IN ('r', 'p')",
        schema,
    )
    return {r["relname"]: r["tenant"] for r in rows}


def classify(
    found: Mapping[str, bool], *, platform: Mapping[str, str], cross_tenant: Mapping[str, str], service: str
) -> tuple[list[str], list[str]]:
    """(tenant tables to audit, problems): every table without tenant_id must be listed as platform."""
    problems, tenant = [], []
    for name, has_tenant in sorted(found.items()):
        if has_tenant and name in platform:
            problems.append(f"{service}.{name}: has tenant_id but is listed as a platform table")
        elif has_tenant and name not in cross_tenant:
            tenant.append(name)
        elif not has_tenant and name in cross_tenant:
            problems.append(f"{service}.{name}: listed as cross-tenant but has no tenant_id")
        elif not has_tenant and name not in platform:
            problems.append(
                f"{service}.{name}: no tenant_id column and not classified: give it tenant_id "
                f"and enable_tenant_rls(), or list it in PLATFORM_TABLES with the reason"
            )
    return tenant, problems


async def rls_problems(conn: asyncpg.Connection, t: Target, tenant_tables: list[str]) -> list[str]:
    """ENABLE + FORCE, at least one policy, and every policy confined by app.tenant_id; no TRUNCATE for the app."""
    problems = []
    for name in tenant_tables:
        rel = f"{_q(t.schema)}.{_q(name)}"
        row = await conn.fetchrow(
            "SELECT relrowsecurity, relforcerowsecurity, has_table_privilege($2, oid, 'TRUNCATE') AS truncate "
            "FROM pg_class WHERE oid = $1::regclass",
            rel,
            t.app_role,
        )
        where = f"{t.where}: {name}"
        if not row["relrowsecurity"]:
            problems.append(f"{where}: row level security is not enabled")
        if not row["relforcerowsecurity"]:
            problems.append(f"{where}: row level security is not FORCEd (the owner bypasses it)")
        if row["truncate"]:
            problems.append(f"{where}: {t.app_role} may TRUNCATE it (TRUNCATE ignores row level security)")
        policies = await conn.fetch(
            "SELECT polname, polpermissive, pg_get_expr(polqual, polrelid) AS qual, "
            "pg_get_expr(polwithcheck, polrelid) AS check FROM pg_policy WHERE polrelid = $1::regclass",
            rel,
        )
        if not policies:
            problems.append(f"{where}: no policy")
        for p in policies:
            for kind in ("qual", "check"):
                if p[kind] is not None and TENANT_RULE not in p[kind]:
                    problems.append(f"{where}: policy {p['polname']} ({kind}) does not use app.tenant_id: {p[kind]}")
            if p["qual"] is None and p["check"] is None:
                problems.append(f"{where}: policy {p['polname']} has no expression")
    return problems


async def role_problems(conn: asyncpg.Connection, app_role: str) -> list[str]:
    """The runtime role: no superuser, no BYPASSRLS, owns nothing here, and is no member of a role that does."""
    problems = []
    role = await conn.fetchrow("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = $1", app_role)
    if role is None:
        return [f"role {app_role} does not exist"]
    if role["rolsuper"]:
        problems.append(f"{app_role} is a superuser")
    if role["rolbypassrls"]:
        problems.append(f"{app_role} has BYPASSRLS")
    owned = await conn.fetch(
        "SELECT n.nspname || '.' || c.relname AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relowner = (SELECT oid FROM pg_roles WHERE rolname = $1) "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' "
        "UNION ALL SELECT nspname FROM pg_namespace WHERE nspowner = (SELECT oid FROM pg_roles WHERE rolname = $1) "
        "UNION ALL SELECT proname FROM pg_proc WHERE proowner = (SELECT oid FROM pg_roles WHERE rolname = $1)",
        app_role,
    )
    problems += [f"{app_role} owns {r['name']}" for r in owned]
    # SET ROLE to an owner would make the owner's privileges (DDL, ALTER ... DISABLE ROW LEVEL SECURITY) its own.
    owners = await conn.fetch(
        "SELECT DISTINCT r.rolname FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND n.nspname NOT LIKE 'pg_toast%' AND r.rolname <> $1 AND pg_has_role($1, r.oid, 'MEMBER')",
        app_role,
    )
    problems += [f"{app_role} is a member of {r['rolname']}, which owns tables" for r in owners]
    return problems


async def bypass_problems(conn: asyncpg.Connection, schema: str, where: str) -> list[str]:
    """No SECURITY DEFINER function and no view without security_invoker (both read past RLS as their owner)."""
    problems = []
    for r in await conn.fetch(
        "SELECT p.oid::regprocedure::text AS name FROM pg_proc p "
        "WHERE p.pronamespace = $1::regnamespace AND p.prosecdef",
        schema,
    ):
        problems.append(f"{where}: function {r['name']} is SECURITY DEFINER")
    for r in await conn.fetch(
        "SELECT c.relname, c.relkind::text, coalesce(c.reloptions, '{}') AS options FROM pg_class c "
        "WHERE c.relnamespace = $1::regnamespace AND c.relkind IN ('v', 'm')",
        schema,
    ):
        if r["relkind"] == "m":
            problems.append(f"{where}: materialized view {r['relname']} (row level security does not apply to it)")
        elif not any(
            o.lower() in ("security_invoker=true", "security_invoker=on", "security_invoker=1") for o in r["options"]
        ):
            problems.append(f"{where}: view {r['relname']} lacks security_invoker=true")
    return problems


async def _insert_probe(owner: asyncpg.Connection, schema: str, table: str) -> None:
    """One row for PROBE_TENANT, written by the owner in a transaction set to that tenant."""
    cols = await owner.fetch(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type, t.typcategory::text, t.typname, "
        "(SELECT e.enumlabel FROM pg_enum e WHERE e.enumtypid = t.oid ORDER BY e.enumsortorder LIMIT 1) AS label "
        "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
        "WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped AND a.attidentity = '' "
        "AND a.attgenerated = '' AND (a.attname = 'tenant_id' OR (a.attnotnull AND NOT a.atthasdef)) "
        "ORDER BY a.attnum",
        f"{_q(schema)}.{_q(table)}",
    )
    names, values = [], []
    for c in cols:
        literal = (
            PROBE_TENANT
            if c["attname"] == "tenant_id"
            else (
                c["label"]
                if c["typcategory"] == "E"
                else _USER_LITERALS.get(c["typname"])
                if c["typcategory"] == "U"
                else _LITERALS.get(c["typcategory"])
            )
        )
        if literal is None:
            raise AssertionError(
                f"{schema}.{table}.{c['attname']}: no probe value for type {c['type']}; add one to tests/rls/audit.py"
            )
        names.append(_q(c["attname"]))
        values.append(f"CAST('{literal}' AS {c['type']})")
    async with owner.transaction():
        await owner.execute("SELECT set_config('app.tenant_id', $1, true)", PROBE_TENANT)
        await owner.execute(f"INSERT INTO {_q(schema)}.{_q(table)} ({', '.join(names)}) VALUES ({', '.join(values)})")


async def probe_problems(t: Target, tenant_tables: list[str]) -> list[str]:
    """The app role reads 0 rows with no tenant (never set, and after a tenant's transaction), its own row as
    the probe tenant, and 0 as another tenant."""
    problems, probed = [], []
    owner = await asyncpg.connect(t.owner_dsn)
    try:
        for name in tenant_tables:
            try:
                await _insert_probe(owner, t.schema, name)
                probed.append(name)
            except asyncpg.PostgresError as exc:
                problems.append(f"{t.where}: {name}: the owner cannot write a row as its tenant: {exc}")
    finally:
        await owner.close()
    try:
        for name in probed:
            problems += await _read_as_app(t, name)
    finally:
        await _delete_probes(t, probed)
    return problems


async def _read_as_app(t: Target, name: str) -> list[str]:
    count, where = f"SELECT count(*) FROM {_q(t.schema)}.{_q(name)}", f"{t.where}: {name}"
    app = await asyncpg.connect(t.app_dsn)  # a fresh session: app.tenant_id never set (NULL)
    try:
        seen = {"unset": await app.fetchval(count)}
        for tenant in (PROBE_TENANT, OTHER_TENANT):
            async with app.transaction():
                await app.execute("SELECT set_config('app.tenant_id', $1, true)", tenant)
                seen[tenant] = await app.fetchval(count)
        seen["after"] = await app.fetchval(count)  # app.tenant_id is now '' rather than never set
    finally:
        await app.close()
    problems = []
    if seen["unset"] or seen["after"]:
        problems.append(f"{where}: {t.app_role} reads {max(seen['unset'], seen['after'])} row(s) with no tenant set")
    if seen[OTHER_TENANT]:
        problems.append(f"{where}: another tenant reads {seen[OTHER_TENANT]} row(s) of the probe tenant")
    if seen[PROBE_TENANT] != 1:
        problems.append(f"{where}: the probe tenant reads {seen[PROBE_TENANT]} of its 1 row (policy too tight?)")
    return problems


async def _delete_probes(t: Target, tenant_tables: list[str]) -> None:
    """Leave the schema as found, so the audit can run again (tests/rls/test_audit_catches.py)."""
    owner = await asyncpg.connect(t.owner_dsn)
    try:
        async with owner.transaction():
            await owner.execute("SELECT set_config('app.tenant_id', $1, true)", PROBE_TENANT)
            for name in tenant_tables:
                await owner.execute(f"DELETE FROM {_q(t.schema)}.{_q(name)} WHERE tenant_id = $1", PROBE_TENANT)
    finally:
        await owner.close()


async def audit(t: Target, *, platform: Mapping[str, str], cross_tenant: Mapping[str, str]) -> list[str]:
    """Every problem of one migrated schema: classification, RLS, the runtime role, bypasses, probe rows."""
    conn = await asyncpg.connect(t.admin_dsn)
    try:
        found = await tables(conn, t.schema)
        tenant, problems = classify(found, platform=platform, cross_tenant=cross_tenant, service=t.where)
        problems += await rls_problems(conn, t, tenant)
        problems += await role_problems(conn, t.app_role)
        problems += await bypass_problems(conn, t.schema, t.where)
    finally:
        await conn.close()
    if not found:
        problems.append(f"{t.where}: no tables in schema {t.schema}: did the migrations run?")
    return problems + await probe_problems(t, tenant)

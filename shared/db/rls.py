"""Postgres row-level security and grants, for use inside Alembic migrations (no-ops on SQLite).

Layer 2 of data isolation (DESIGN §3): even raw SQL that bypasses the ORM sees only the rows of
the tenant named by `app.tenant_id`, which TenantSession sets transaction-locally. FORCE makes
the policy apply to the table owner too; the runtime role owns nothing and has no BYPASSRLS.

    def upgrade() -> None:
        op.create_table("notes", ...)
        enable_tenant_rls("notes")
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from alembic import op
from sqlalchemy.engine import Connection

DEFAULT_APP_ROLE = "bulkhead_app"
"""The runtime role's name when BULKHEAD_DB_APP_ROLE is not set."""
POLICY_NAME = "tenant_isolation"
"""The name of the policy enable_tenant_rls creates."""


def quote_ident(name: str) -> str:
    """A Postgres identifier, double-quoted."""
    return '"' + name.replace('"', '""') + '"'


def app_role_from_env(env: Mapping[str, str] = os.environ) -> str:
    """The runtime role migrations grant to: BULKHEAD_DB_APP_ROLE, default bulkhead_app."""
    return env.get("BULKHEAD_DB_APP_ROLE") or DEFAULT_APP_ROLE


def tenant_rls_statements(table: str, column: str = "tenant_id") -> list[str]:
    """The SQL that confines `table` to the tenant named by app.tenant_id (idempotent)."""
    t, c = quote_ident(table), quote_ident(column)
    rule = f"({c} = current_setting('app.tenant_id', true))"
    return [
        f"ALTER TABLE {t} ENABLE ROW LEVEL SECURITY",
        f"ALTER TABLE {t} FORCE ROW LEVEL SECURITY",
        f"DROP POLICY IF EXISTS {POLICY_NAME} ON {t}",
        f"CREATE POLICY {POLICY_NAME} ON {t} USING {rule} WITH CHECK {rule}",
    ]


def enable_tenant_rls(table: str, *, column: str = "tenant_id") -> None:
    """Migration step: ENABLE + FORCE row-level security on `table` with the tenant policy."""
    if op.get_bind().dialect.name != "postgresql":
        return
    for statement in tenant_rls_statements(table, column):
        op.execute(statement)


def disable_tenant_rls(table: str) -> None:
    """Migration step (downgrade): drop the tenant policy and row-level security from `table`."""
    if op.get_bind().dialect.name != "postgresql":
        return
    t = quote_ident(table)
    op.execute(f"DROP POLICY IF EXISTS {POLICY_NAME} ON {t}")
    op.execute(f"ALTER TABLE {t} NO FORCE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {t} DISABLE ROW LEVEL SECURITY")


_GRANT_LOCK = 0x6275_6C6B_6772_6E74
"""Advisory lock key that serialises grants to the runtime role ("bulkgrnt")."""


def grant_statements(role: str, schema: str) -> list[str]:
    """The SQL that lets `role` use every table and sequence of `schema` (DML only, no DDL)."""
    r, s = quote_ident(role), quote_ident(schema)
    return [
        f"GRANT USAGE ON SCHEMA {s} TO {r}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {s} TO {r}",
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {s} TO {r}",
    ]


def grant_to(connection: Connection, role: str, *, exclude: tuple[str, ...] = ()) -> None:
    """Grant DML on the connection's current schema to `role`, minus the `exclude`d tables."""
    if connection.dialect.name != "postgresql":
        return
    # Services migrating one database at once (`bulkhead up` on a single Postgres) would update the
    # schema's ACL row together and fail with "tuple concurrently updated": take turns, until commit.
    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_GRANT_LOCK})")
    schema = connection.exec_driver_sql("SELECT current_schema()").scalar_one()
    for statement in grant_statements(role, schema):
        connection.exec_driver_sql(statement)
    for table in exclude:
        connection.exec_driver_sql(f"REVOKE ALL ON {quote_ident(schema)}.{quote_ident(table)} FROM {quote_ident(role)}")


def grant_app_role(role: str | None = None) -> None:
    """Migration step: grant DML on the current schema's tables and sequences to the runtime role.

    The role is `role`, else the one Database.open/upgrade() was given, else BULKHEAD_DB_APP_ROLE;
    any of those must exist. Only the built-in default (bulkhead_app) is skipped when absent: a
    single-role deployment has nobody to grant to.
    """
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    role = role or _upgrade_app_role() or os.environ.get("BULKHEAD_DB_APP_ROLE")
    if role is None:
        role = DEFAULT_APP_ROLE
        if not bind.exec_driver_sql(f"SELECT 1 FROM pg_roles WHERE rolname = '{role}'").scalar():
            return
    grant_to(bind, role)


def _upgrade_app_role() -> str | None:
    from alembic import context  # the running migration's config (see shared.db.migrations.upgrade)

    try:
        return context.config.attributes.get("app_role")
    except (AttributeError, NameError):  # not inside an Alembic run
        return None

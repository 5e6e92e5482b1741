"""The TenantOwned mixin's own tenant_id index, dropped by a migration where a key of the table already
leads with tenant_id (the mixin leaves it out of such a table's model: shared.db.base).

That index only repeats the key: it costs every insert, and while a table has no statistics (a fresh
database, bridge schema or silo database, until autovacuum analyzes it) it offers the planner a walk of
all the tenant's rows in place of a key probe, which metering's migration 0009 measured at about 5x the
database's CPU per Reserve+Commit. Alembic operations: call them from a migration's upgrade/downgrade.
"""

from __future__ import annotations

from collections.abc import Iterable

from alembic import op


def drop_tenant_indexes(tables: Iterable[str]) -> None:
    """Drop ix_<table>_tenant_id from each table (upgrade)."""
    for table in tables:
        op.drop_index(f"ix_{table}_tenant_id", table_name=table)


def create_tenant_indexes(tables: Iterable[str]) -> None:
    """Create ix_<table>_tenant_id on each table again (downgrade)."""
    for table in tables:
        op.create_index(f"ix_{table}_tenant_id", table, ["tenant_id"])

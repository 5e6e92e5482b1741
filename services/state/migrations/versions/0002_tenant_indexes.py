"""state: drop the TenantOwned mixin's tenant_id index from every table; each table's primary key or
another index already leads with tenant_id.

Each append inserts an event and an audit row and moves its thread: one index fewer to write on each,
and no tenant-wide index for the planner to prefer over a key probe while a table has no statistics
(what metering's migration 0009 measured).

Revision ID: 0002_tenant_indexes
Revises: 0001_state_tables
"""

from __future__ import annotations

from alembic import op

revision = "0002_tenant_indexes"
down_revision = "0001_state_tables"
branch_labels = None
depends_on = None

_TABLES = (
    "state_threads",
    "state_thread_labels",
    "state_events",
    "state_snapshots",
    "state_context",
    "state_data_keys",
    "state_audit",
)


def upgrade() -> None:
    for table in _TABLES:
        op.drop_index(f"ix_{table}_tenant_id", table_name=table)


def downgrade() -> None:
    for table in _TABLES:
        op.create_index(f"ix_{table}_tenant_id", table, ["tenant_id"])

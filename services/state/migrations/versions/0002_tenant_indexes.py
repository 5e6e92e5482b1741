"""state: drop the tenant_id index of every state table; each one's primary key or another index already
leads with tenant_id (shared.db.tenant_index says why). Each append writes an event and an audit row.

Revision ID: 0002_tenant_indexes
Revises: 0001_state_tables
"""

from __future__ import annotations

from shared.db.tenant_index import create_tenant_indexes, drop_tenant_indexes

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
    drop_tenant_indexes(_TABLES)


def downgrade() -> None:
    create_tenant_indexes(_TABLES)

"""identity: drop the tenant_id index of principals; its unique (tenant_id, display_name) already leads with
tenant_id.

The index only repeated that key, cost every insert, and offered the planner a walk of all the tenant's rows
while a table has no statistics (what metering's migration 0009 measured).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_TABLES = ("principals",)


def upgrade() -> None:
    for table in _TABLES:
        op.drop_index(f"ix_{table}_tenant_id", table_name=table)


def downgrade() -> None:
    for table in _TABLES:
        op.create_index(f"ix_{table}_tenant_id", table, ["tenant_id"])

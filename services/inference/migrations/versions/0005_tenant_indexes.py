"""inference: drop the tenant_id index of policies and private models; their unique keys, (tenant_id) and
(tenant_id, name), already lead with it.

The index only repeated that key, cost every insert, and offered the planner a walk of all the tenant's rows
while a table has no statistics (what metering's migration 0009 measured).

Revision ID: 0005_tenant_indexes
Revises: 0004_retention
"""

from __future__ import annotations

from alembic import op

revision = "0005_tenant_indexes"
down_revision = "0004_retention"
branch_labels = None
depends_on = None

_TABLES = ("inference_policies", "inference_private_models")


def upgrade() -> None:
    for table in _TABLES:
        op.drop_index(f"ix_{table}_tenant_id", table_name=table)


def downgrade() -> None:
    for table in _TABLES:
        op.create_index(f"ix_{table}_tenant_id", table, ["tenant_id"])

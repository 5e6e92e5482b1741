"""credentials: drop the tenant_id index of secrets, versions, the audit chain and its head, local keys and local
values; a unique key of each already leads with tenant_id.

The index only repeated that key, cost every insert, and offered the planner a walk of all the tenant's rows
while a table has no statistics (what metering's migration 0009 measured).

Revision ID: 0003_tenant_indexes
Revises: 0002_retention
"""

from __future__ import annotations

from alembic import op

revision = "0003_tenant_indexes"
down_revision = "0002_retention"
branch_labels = None
depends_on = None

_TABLES = (
    "cred_secrets",
    "cred_secret_versions",
    "cred_audit_events",
    "cred_audit_heads",
    "cred_local_keys",
    "cred_local_values",
)


def upgrade() -> None:
    for table in _TABLES:
        op.drop_index(f"ix_{table}_tenant_id", table_name=table)


def downgrade() -> None:
    for table in _TABLES:
        op.create_index(f"ix_{table}_tenant_id", table, ["tenant_id"])

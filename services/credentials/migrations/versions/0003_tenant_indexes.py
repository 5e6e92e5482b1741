"""credentials: drop the tenant_id index of secrets, versions, the audit chain and its head, local keys and
local values; a unique key of each already leads with tenant_id (shared.db.tenant_index says why).

Revision ID: 0003_tenant_indexes
Revises: 0002_retention
"""

from __future__ import annotations

from shared.db.tenant_index import create_tenant_indexes, drop_tenant_indexes

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
    drop_tenant_indexes(_TABLES)


def downgrade() -> None:
    create_tenant_indexes(_TABLES)

"""inference: drop the tenant_id index of policies and private models; their unique keys, (tenant_id) and
(tenant_id, name), already lead with it (shared.db.tenant_index says why).

Revision ID: 0005_tenant_indexes
Revises: 0004_retention
"""

from __future__ import annotations

from shared.db.tenant_index import create_tenant_indexes, drop_tenant_indexes

revision = "0005_tenant_indexes"
down_revision = "0004_retention"
branch_labels = None
depends_on = None

_TABLES = ("inference_policies", "inference_private_models")


def upgrade() -> None:
    drop_tenant_indexes(_TABLES)


def downgrade() -> None:
    create_tenant_indexes(_TABLES)

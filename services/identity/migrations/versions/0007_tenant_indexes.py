"""identity: drop the tenant_id index of principals; its unique (tenant_id, display_name) already leads
with it (shared.db.tenant_index says why).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from shared.db.tenant_index import create_tenant_indexes, drop_tenant_indexes

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_TABLES = ("principals",)


def upgrade() -> None:
    drop_tenant_indexes(_TABLES)


def downgrade() -> None:
    create_tenant_indexes(_TABLES)

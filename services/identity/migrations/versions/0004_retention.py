"""identity: each tenant's retention policy (shared.retention): days of audit events and of usage detail;
and the configuration audit chain's retention anchor (shared.config_audit.add_anchor).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from shared.config_audit import add_anchor, drop_anchor

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL: the default (shared.retention.DEFAULT_*), so a changed default reaches every tenant left at it.
    op.add_column("tenants", sa.Column("audit_retention_days", sa.Integer, nullable=True))
    op.add_column("tenants", sa.Column("usage_detail_retention_days", sa.Integer, nullable=True))
    add_anchor("identity")


def downgrade() -> None:
    drop_anchor("identity")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("usage_detail_retention_days")
        batch.drop_column("audit_retention_days")

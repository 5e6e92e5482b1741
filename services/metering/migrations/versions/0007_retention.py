"""metering: the configuration audit chain's retention anchor (shared.config_audit.add_anchor): where a
tenant's chain starts once its retention pruned the oldest events; and where each tenant's per-event
usage detail ends (metering_usage_retention, services/metering/retention.py).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from shared.config_audit import add_anchor, drop_anchor
from shared.db.rls import disable_tenant_rls, enable_tenant_rls

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_anchor("metering")
    op.create_table(
        "metering_usage_retention",
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("pruned_before_hour", sa.Integer, nullable=False),
        sa.Column("pruned_events", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", name="pk_metering_usage_retention"),
    )
    enable_tenant_rls("metering_usage_retention")


def downgrade() -> None:
    disable_tenant_rls("metering_usage_retention")
    op.drop_table("metering_usage_retention")
    drop_anchor("metering")

"""Drop the usage table's tenant_id index: the primary key (tenant_id, idempotency_key) already serves it.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_metering_usage_events_tenant_id", table_name="metering_usage_events")


def downgrade() -> None:
    op.create_index("ix_metering_usage_events_tenant_id", "metering_usage_events", ["tenant_id"])

"""identity: tenant deletion plans, their steps and signed receipts.

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op

from shared.db.rls import grant_app_role

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "tenant_deletions",
        # target_tenant, not tenant_id: a platform record about a tenant (the coordinator reads every
        # tenant's plan), like metering's operator audit, not a row the tenant owns under RLS.
        sa.Column("target_tenant", sa.String(64), primary_key=True),
        sa.Column("tier", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("requested_at", _TS, nullable=False),
        sa.Column("delete_after", _TS, nullable=False),
        sa.Column("lease_until", _TS, nullable=True),
        sa.Column("completed_at", _TS, nullable=True),
        sa.Column("receipt_body", sa.LargeBinary, nullable=True),
        sa.Column("receipt_signature", sa.LargeBinary, nullable=True),
        sa.Column("receipt_kid", sa.String(64), nullable=True),
    )
    op.create_table(
        "tenant_deletion_steps",
        sa.Column("target_tenant", sa.String(64), primary_key=True),
        sa.Column("service", sa.String(32), primary_key=True),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("done", sa.Boolean, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.String(300), nullable=False),
        sa.Column("inventory", sa.Text, nullable=True),
        sa.Column("result", sa.Text, nullable=True),
    )
    grant_app_role()


def downgrade() -> None:
    op.drop_table("tenant_deletion_steps")
    op.drop_table("tenant_deletions")

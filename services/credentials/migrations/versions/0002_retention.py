"""credentials: the access audit chain's retention anchor (shared.retention): where a tenant's chain
starts once its retention pruned the oldest events.

Revision ID: 0002_retention
Revises: 0001_credentials_tables
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_retention"
down_revision = "0001_credentials_tables"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("cred_audit_heads", sa.Column("anchor_seq", sa.BigInteger, nullable=False, server_default="0"))
    op.add_column("cred_audit_heads", sa.Column("anchor_hash", sa.String(64), nullable=False, server_default="0" * 64))
    op.add_column("cred_audit_heads", sa.Column("anchor_time_us", sa.BigInteger, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("cred_audit_heads") as batch:
        for name in ("anchor_time_us", "anchor_hash", "anchor_seq"):
            batch.drop_column(name)

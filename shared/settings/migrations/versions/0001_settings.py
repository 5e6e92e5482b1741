"""The settings table: values every replica of a service shares (e.g. its page-token key). No tenant data.

Revision ID: 0001_settings
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_settings"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bulkhead_settings",
        sa.Column("service", sa.String(32), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("service", "name", name="pk_bulkhead_settings"),
    )


def downgrade() -> None:
    op.drop_table("bulkhead_settings")

"""Holds keep the rates they were priced with, so a settlement is priced in the UPDATE that claims it.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_RATES = ("rate_input", "rate_output", "rate_cache_write", "rate_cache_read")


def upgrade() -> None:
    with op.batch_alter_table("metering_holds") as batch:
        for name in _RATES:
            batch.add_column(sa.Column(name, sa.BigInteger, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("metering_holds") as batch:
        for name in _RATES:
            batch.drop_column(name)

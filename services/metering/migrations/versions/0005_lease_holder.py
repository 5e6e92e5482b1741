"""Leases name their holder and carry what it last reported in flight (charged if the lease expires).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("metering_holds") as batch:
        batch.add_column(sa.Column("holder", sa.String(200), nullable=False, server_default=""))
        batch.add_column(sa.Column("in_flight_tokens", sa.BigInteger, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("metering_holds") as batch:
        batch.drop_column("in_flight_tokens")
        batch.drop_column("holder")

"""The write-ahead attempt journal: every upstream attempt is recorded before it is sent.

Revision ID: 0002_attempts
Revises: 0001_inference_tables
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_attempts"
down_revision = "0001_inference_tables"
branch_labels = None
depends_on = None

_ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "inference_attempts",
        sa.Column("id", _ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(200), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("replica", sa.String(200), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("reserve_input", sa.BigInteger(), nullable=False),
        sa.Column("reserve_output", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.SmallInteger(), nullable=False),
        sa.Column("at_reservation", sa.SmallInteger(), nullable=False, server_default="0"),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("cache_write_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("cache_read_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("outcome", sa.String(16), nullable=False, server_default=""),
        sa.Column("latency_ms", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("context", sa.Text(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("tenant_id", "request_id", "attempt", name="uq_inference_attempts_attempt"),
    )
    op.create_index("ix_inference_attempts_state_created", "inference_attempts", ["state", "created_ms"])


def downgrade() -> None:
    op.drop_table("inference_attempts")

"""The run queue remembers StartRun's trace context, so a run continues its caller's trace.

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


def upgrade() -> None:
    with op.batch_alter_table("orch_run_queue") as batch:
        batch.add_column(sa.Column("traceparent", sa.String(64), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("orch_run_queue") as batch:
        batch.drop_column("traceparent")

"""Runs keep StartRun's trace id (Run.trace_id); steps get agent, time and latency columns so
GetRunStats groups and ranks them in SQL. Existing steps are backfilled from their payloads.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("orch_runs") as batch:
        batch.add_column(sa.Column("trace_id", sa.String(32), nullable=False, server_default=""))
    with op.batch_alter_table("orch_steps") as batch:
        batch.add_column(sa.Column("agent", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("created_at", sa.Float, nullable=False, server_default="0"))
        batch.add_column(sa.Column("latency_ms", sa.Float, nullable=True))
    op.create_index("ix_orch_steps_tenant_created", "orch_steps", ["tenant_id", "created_at"])
    _backfill_steps()


def _backfill_steps() -> None:
    # Same rule as store.step_latency_ms: time since the run's step before, none for the first and RUN_FINISHED.
    # FORCE'd RLS would hide every row from the owner running this; lifted inside this transaction only.
    bind = op.get_bind()
    postgres = bind.dialect.name == "postgresql"
    if postgres:
        op.execute("ALTER TABLE orch_steps NO FORCE ROW LEVEL SECURITY")
    steps = sa.table(
        "orch_steps",
        sa.column("run_id"),
        sa.column("idx"),
        sa.column("payload"),
        sa.column("agent"),
        sa.column("created_at"),
        sa.column("latency_ms"),
    )
    rows = bind.execute(
        sa.select(steps.c.run_id, steps.c.idx, steps.c.payload).order_by(steps.c.run_id, steps.c.idx)
    ).all()
    prev: tuple[str, int, float] | None = None
    for run_id, idx, payload in rows:
        d = json.loads(payload)
        at = float(d.get("created_at") or 0.0)
        latency = None
        if prev and prev[0] == run_id and prev[1] == idx - 1 and d.get("kind") != "run_finished":
            latency = max(0.0, (at - prev[2]) * 1000.0)
        bind.execute(
            steps.update()
            .where(steps.c.run_id == run_id, steps.c.idx == idx)
            .values(agent=d.get("agent", ""), created_at=at, latency_ms=latency)
        )
        prev = (run_id, idx, at)
    if postgres:
        op.execute("ALTER TABLE orch_steps FORCE ROW LEVEL SECURITY")


def downgrade() -> None:
    op.drop_index("ix_orch_steps_tenant_created", "orch_steps")
    with op.batch_alter_table("orch_steps") as batch:
        batch.drop_column("latency_ms")
        batch.drop_column("created_at")
        batch.drop_column("agent")
    with op.batch_alter_table("orch_runs") as batch:
        batch.drop_column("trace_id")

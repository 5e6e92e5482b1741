"""Orchestrator tables: teams, runs, recorded steps (tenant-owned, RLS) and the run queue (platform).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from shared.db.rls import disable_tenant_rls, enable_tenant_rls, grant_app_role

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_TENANT_TABLES = ("orch_teams", "orch_runs", "orch_steps")


def _tenant() -> sa.Column:
    return sa.Column("tenant_id", sa.String(64), nullable=False)


def upgrade() -> None:
    op.create_table(
        "orch_teams",
        _tenant(),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("etag", sa.String(40), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_orch_teams"),
        sa.UniqueConstraint("tenant_id", "name", name="uq_orch_teams_tenant_name"),
    )
    op.create_table(
        "orch_runs",
        _tenant(),
        sa.Column("run_id", sa.String(40), nullable=False),
        sa.Column("team", sa.String(64), nullable=False),
        sa.Column("team_spec", sa.Text, nullable=False),
        sa.Column("entry_agent", sa.String(64), nullable=False),
        sa.Column("input", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("current_agent", sa.String(64), nullable=False),
        sa.Column("output", sa.Text, nullable=False),
        sa.Column("error_reason", sa.String(64), nullable=False),
        sa.Column("error_message", sa.Text, nullable=False),
        sa.Column("step_count", sa.Integer, nullable=False),
        sa.Column("idempotency_key", sa.String(128), nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("run_id", name="pk_orch_runs"),
        sa.UniqueConstraint("tenant_id", "idempotency_key", name="uq_orch_runs_tenant_idem"),
    )
    op.create_index("ix_orch_runs_tenant_created", "orch_runs", ["tenant_id", "created_at"])
    op.create_table(
        "orch_steps",
        _tenant(),
        sa.Column("run_id", sa.String(40), nullable=False),
        sa.Column("idx", sa.Integer, nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "idx", name="pk_orch_steps"),
    )
    op.create_table(
        "orch_run_queue",
        sa.Column("run_id", sa.String(40), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("principal_id", sa.String(64), nullable=False),
        sa.Column("tier", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("enqueued_at", sa.Float, nullable=False),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_expires", sa.Float, nullable=False),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("grant", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("run_id", name="pk_orch_run_queue"),
    )
    op.create_index("ix_orch_run_queue_state", "orch_run_queue", ["state", "enqueued_at"])
    for table in _TENANT_TABLES:
        op.create_index(f"ix_{table}_tenant_id", table, ["tenant_id"])
        enable_tenant_rls(table)
    grant_app_role()


def downgrade() -> None:
    for table in _TENANT_TABLES:
        disable_tenant_rls(table)
    for table in ("orch_run_queue", "orch_steps", "orch_runs", "orch_teams"):
        op.drop_table(table)

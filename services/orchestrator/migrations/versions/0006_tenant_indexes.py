"""orchestrator: drop the TenantOwned mixin's tenant_id index from teams, runs and steps; another key of
each already leads with tenant_id ((tenant_id, name), (tenant_id, created_at)).

A run inserts its row and a row per step: one index fewer to write on each, and no tenant-wide index
for the planner to weigh against a key probe while a table has no statistics.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_TABLES = ("orch_teams", "orch_runs", "orch_steps")


def upgrade() -> None:
    for table in _TABLES:
        op.drop_index(f"ix_{table}_tenant_id", table_name=table)


def downgrade() -> None:
    for table in _TABLES:
        op.create_index(f"ix_{table}_tenant_id", table, ["tenant_id"])

"""orchestrator: drop the tenant_id index of teams, runs and steps; (tenant_id, name) and (tenant_id,
created_at) already lead with it (shared.db.tenant_index says why). A run writes a row per step.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from shared.db.tenant_index import create_tenant_indexes, drop_tenant_indexes

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_TABLES = ("orch_teams", "orch_runs", "orch_steps")


def upgrade() -> None:
    drop_tenant_indexes(_TABLES)


def downgrade() -> None:
    create_tenant_indexes(_TABLES)

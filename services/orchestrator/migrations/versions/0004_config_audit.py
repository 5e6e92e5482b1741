"""orchestrator: the configuration audit's hash chain (shared.config_audit): events and each tenant's head.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from shared.config_audit import create_tables, drop_tables

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_tables("orchestrator")


def downgrade() -> None:
    drop_tables("orchestrator")

"""inference: the configuration audit's hash chain (shared.config_audit): events and each tenant's head.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from shared.config_audit import create_tables, drop_tables

revision = "0003_config_audit"
down_revision = "0002_attempts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_tables("inference")


def downgrade() -> None:
    drop_tables("inference")

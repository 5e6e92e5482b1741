"""identity: the configuration audit's hash chain (shared.config_audit): events and each tenant's head.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from shared.config_audit import create_tables, drop_tables

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_tables("identity")


def downgrade() -> None:
    drop_tables("identity")

"""metering: the configuration audit's hash chain (shared.config_audit): events and each tenant's head.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from shared.config_audit import create_tables, drop_tables

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_tables("metering")


def downgrade() -> None:
    drop_tables("metering")

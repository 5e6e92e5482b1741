"""metering: the configuration audit chain's retention anchor (shared.config_audit.add_anchor): where a
tenant's chain starts once its retention pruned the oldest events.

Revision ID: 0007
Revises: 0006
"""
from __future__ import annotations

from shared.config_audit import add_anchor, drop_anchor

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_anchor("metering")


def downgrade() -> None:
    drop_anchor("metering")

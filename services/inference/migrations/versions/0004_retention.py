"""inference: the configuration audit chain's retention anchor (shared.config_audit.add_anchor): where a
tenant's chain starts once its retention pruned the oldest events.

Revision ID: 0004_retention
Revises: 0003_config_audit
"""

from __future__ import annotations

from shared.config_audit import add_anchor, drop_anchor

revision = "0004_retention"
down_revision = "0003_config_audit"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_anchor("inference")


def downgrade() -> None:
    drop_anchor("inference")

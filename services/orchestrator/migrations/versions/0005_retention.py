"""orchestrator: the configuration audit chain's retention anchor (shared.config_audit.add_anchor): where a
tenant's chain starts once its retention pruned the oldest events.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from shared.config_audit import add_anchor, drop_anchor

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_anchor("orchestrator")


def downgrade() -> None:
    drop_anchor("orchestrator")

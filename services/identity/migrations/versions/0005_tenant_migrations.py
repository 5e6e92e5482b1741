"""identity: live tier migrations (services/identity/migration.py): the durable record and its steps.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from shared.db.rls import grant_app_role

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    # target_tenant, not tenant_id: platform records about a tenant, read by the coordinator (as deletions).
    op.create_table(
        "tenant_migrations",
        sa.Column("target_tenant", sa.String(64), primary_key=True),
        sa.Column("source_tier", sa.String(16), nullable=False),
        sa.Column("target_tier", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("requested_at", _TS, nullable=False),
        sa.Column("lease_until", _TS, nullable=True),
        sa.Column("completed_at", _TS, nullable=True),
        sa.Column("pause_ms", sa.Integer, nullable=False),
        sa.Column("last_error", sa.String(300), nullable=False),
    )
    op.create_table(
        "tenant_migration_steps",
        sa.Column("target_tenant", sa.String(64), primary_key=True),
        sa.Column("service", sa.String(32), primary_key=True),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.String(300), nullable=False),
        sa.Column("verify", sa.Text, nullable=True),
        sa.Column("released", sa.Text, nullable=True),
    )
    grant_app_role()


def downgrade() -> None:
    op.drop_table("tenant_migration_steps")
    op.drop_table("tenant_migrations")

"""identity: a tenant's migration may move it to another data-residency region (source_region, target_region).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing plans moved a tier within the tenant's region: both sides are that region ("" = unchanged).
    op.add_column("tenant_migrations", sa.Column("source_region", sa.String(32), nullable=False, server_default=""))
    op.add_column("tenant_migrations", sa.Column("target_region", sa.String(32), nullable=False, server_default=""))


def downgrade() -> None:
    op.drop_column("tenant_migrations", "target_region")
    op.drop_column("tenant_migrations", "source_region")

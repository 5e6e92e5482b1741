"""metering: holds are found by (tenant, hold id) through one unique index, replacing the tenant-only index.

Every settle, renewal and explanation looks a hold up by tenant and id. With only a tenant_id index
and the primary key on hold_id, the planner's costs for the two tie while a table has no statistics
(a fresh database, bridge schema or silo database, until autovacuum analyzes it), and PL/pgSQL keeps
the plan it made then for the connection's life: measured, every settle walked all of the tenant's
holds through the tenant_id index (about 5x the database's CPU per Reserve+Commit after a few thousand
holds, and growing). An index on (tenant_id, hold_id) matches both conditions, so it wins at any size.
It also serves whatever the tenant-only index served (its leading column), so that one goes: each hold
still maintains the same number of indexes.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("uq_metering_holds_tenant_hold", "metering_holds", ["tenant_id", "hold_id"], unique=True)
    op.drop_index("ix_metering_holds_tenant_id", table_name="metering_holds")


def downgrade() -> None:
    op.create_index("ix_metering_holds_tenant_id", "metering_holds", ["tenant_id"])
    op.drop_index("uq_metering_holds_tenant_hold", table_name="metering_holds")

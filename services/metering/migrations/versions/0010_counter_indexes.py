"""metering: drop the tenant_id index of quotas, budgets and budget counters; each one's primary key already
leads with tenant_id (shared.db.tenant_index says why).

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from shared.db.tenant_index import create_tenant_indexes, drop_tenant_indexes

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_TABLES = ("metering_quotas", "metering_budgets", "metering_budget_counters")


def upgrade() -> None:
    drop_tenant_indexes(_TABLES)


def downgrade() -> None:
    create_tenant_indexes(_TABLES)

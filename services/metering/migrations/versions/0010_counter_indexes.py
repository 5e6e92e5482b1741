"""metering: drop the tenant_id indexes of quotas, budgets and budget counters; each table's primary key
already leads with tenant_id.

They only repeated the primary key, cost each insert (a counter row per unit and period), and, while a
table has no statistics, gave the planner a tenant-wide index to choose over the primary key probe that
every Reserve and Commit makes on the counters (what migration 0009 measured for the holds).

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_TABLES = ("metering_quotas", "metering_budgets", "metering_budget_counters")


def upgrade() -> None:
    for table in _TABLES:
        op.drop_index(f"ix_{table}_tenant_id", table_name=table)


def downgrade() -> None:
    for table in _TABLES:
        op.create_index(f"ix_{table}_tenant_id", table, ["tenant_id"])

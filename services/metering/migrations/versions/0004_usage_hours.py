"""The hourly usage roll-up (rollup.py), backfilled from the events already stored.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from shared.db.rls import disable_tenant_rls, enable_tenant_rls

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_SUMS = ("event_count", "input_tokens", "output_tokens", "cache_write_tokens", "cache_read_tokens")


def upgrade() -> None:
    op.create_table(
        "metering_usage_hours",
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("hour", sa.Integer, nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("agent_id", sa.String(200), nullable=False),
        sa.Column("principal_id", sa.String(200), nullable=False),
        sa.Column("outcome", sa.SmallInteger, nullable=False),
        *(sa.Column(name, sa.BigInteger, nullable=False) for name in _SUMS),
        sa.PrimaryKeyConstraint(
            "tenant_id", "hour", "model", "agent_id", "principal_id", "outcome", name="pk_metering_usage_hours"
        ),
    )
    enable_tenant_rls("metering_usage_hours")
    postgres = op.get_bind().dialect.name == "postgresql"
    # FORCE'd RLS shows the owner running this no tenant's rows; lifted inside this transaction only.
    tables = ("metering_usage_events", "metering_usage_hours")
    if postgres:
        for table in tables:
            op.execute(f"ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY")
    op.execute(
        "INSERT INTO metering_usage_hours (tenant_id, hour, model, agent_id, principal_id, outcome, "
        f"{', '.join(_SUMS)}) SELECT tenant_id, hour, model, agent_id, principal_id, outcome, count(*), "
        "sum(input_tokens), sum(output_tokens), sum(cache_write_tokens), sum(cache_read_tokens) "
        "FROM metering_usage_events GROUP BY tenant_id, hour, model, agent_id, principal_id, outcome"
    )
    if postgres:
        for table in tables:
            op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")


def downgrade() -> None:
    disable_tenant_rls("metering_usage_hours")
    op.drop_table("metering_usage_hours")

"""Metering tables: usage events, prices, quotas, budgets, counters, holds, tenants, operator audit.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from shared.db.rls import disable_tenant_rls, enable_tenant_rls

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_TENANT_TABLES = (
    "metering_usage_events",
    "metering_quotas",
    "metering_budgets",
    "metering_budget_counters",
    "metering_holds",
)


def _tenant() -> sa.Column:
    return sa.Column("tenant_id", sa.String(64), nullable=False)


def upgrade() -> None:
    big = sa.BigInteger
    op.create_table(
        "metering_usage_events",
        _tenant(),
        sa.Column("idempotency_key", sa.String(200), nullable=False),
        sa.Column("principal_id", sa.String(200), nullable=False),
        sa.Column("agent_id", sa.String(200), nullable=False),
        sa.Column("run_id", sa.String(200), nullable=False),
        sa.Column("trace_id", sa.String(200), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("input_tokens", big, nullable=False),
        sa.Column("output_tokens", big, nullable=False),
        sa.Column("cache_write_tokens", big, nullable=False),
        sa.Column("cache_read_tokens", big, nullable=False),
        sa.Column("latency_ms", big, nullable=False),
        sa.Column("outcome", sa.SmallInteger, nullable=False),
        sa.Column("occurred_us", big, nullable=False),
        sa.Column("hour", sa.Integer, nullable=False),
        sa.Column("day", sa.Integer, nullable=False),
        sa.Column("recorded_us", big, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "idempotency_key", name="pk_metering_usage_events"),
    )
    op.create_index("ix_metering_usage_events_tenant_time", "metering_usage_events", ["tenant_id", "occurred_us"])

    op.create_table(
        "metering_prices",
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("effective_us", big, nullable=False),
        sa.Column("input_micros", big, nullable=False),
        sa.Column("output_micros", big, nullable=False),
        sa.Column("cache_write_micros", big, nullable=False),
        sa.Column("cache_read_micros", big, nullable=False),
        sa.PrimaryKeyConstraint("model", "effective_us", name="pk_metering_prices"),
    )

    op.create_table(
        "metering_quotas",
        _tenant(),
        sa.Column("requests_per_minute", big, nullable=False),
        sa.Column("tokens_per_minute", big, nullable=False),
        sa.Column("concurrent_calls", big, nullable=False),
        sa.Column("updated_us", big, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", name="pk_metering_quotas"),
    )

    op.create_table(
        "metering_budgets",
        _tenant(),
        sa.Column("unit", sa.String(16), nullable=False),
        sa.Column("limit_amount", big, nullable=False),
        sa.Column("period", sa.String(8), nullable=False),
        sa.Column("hard", sa.Boolean, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "unit", name="pk_metering_budgets"),
    )

    op.create_table(
        "metering_budget_counters",
        _tenant(),
        sa.Column("unit", sa.String(16), nullable=False),
        sa.Column("period_us", big, nullable=False),
        sa.Column("used", big, nullable=False),
        sa.Column("held", big, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "unit", "period_us", name="pk_metering_budget_counters"),
    )

    op.create_table(
        "metering_holds",
        _tenant(),
        sa.Column("hold_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("tokens_held", big, nullable=False),
        sa.Column("micros_held", big, nullable=False),
        sa.Column("tokens_period_us", big, nullable=False),
        sa.Column("micros_period_us", big, nullable=False),
        sa.Column("priced_at_us", big, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("over_budget", sa.Boolean, nullable=False),
        sa.Column("created_us", big, nullable=False),
        sa.Column("expires_us", big, nullable=False),
        sa.Column("settled_us", big, nullable=False),
        sa.Column("spent_input", big, nullable=False),
        sa.Column("spent_output", big, nullable=False),
        sa.Column("spent_cache_write", big, nullable=False),
        sa.Column("spent_cache_read", big, nullable=False),
        sa.Column("charged_tokens", big, nullable=False),
        sa.Column("charged_micros", big, nullable=False),
        sa.PrimaryKeyConstraint("hold_id", name="pk_metering_holds"),
    )
    op.create_index("ix_metering_holds_open", "metering_holds", ["tenant_id", "state", "expires_us"])
    op.create_index("uq_metering_holds_key", "metering_holds", ["tenant_id", "idempotency_key"], unique=True)

    op.create_table(
        "metering_tenants",
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("tier", sa.String(16), nullable=False),
        sa.Column("first_seen_us", big, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", name="pk_metering_tenants"),
    )

    op.create_table(
        "metering_operator_audit",
        sa.Column("audit_id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("at_us", big, nullable=False),
        sa.Column("operator_id", sa.String(200), nullable=False),
        sa.Column("request_id", sa.String(200), nullable=False),
        sa.Column("method", sa.String(64), nullable=False),
        sa.Column("target_tenant", sa.String(64), nullable=False),
        sa.Column("detail", sa.String(500), nullable=False),
        sa.PrimaryKeyConstraint("audit_id", name="pk_metering_operator_audit"),
    )

    for table in _TENANT_TABLES:
        op.create_index(f"ix_{table}_tenant_id", table, ["tenant_id"])
        enable_tenant_rls(table)


def downgrade() -> None:
    for table in _TENANT_TABLES:
        disable_tenant_rls(table)
    for table in (
        "metering_operator_audit",
        "metering_tenants",
        "metering_holds",
        "metering_budget_counters",
        "metering_budgets",
        "metering_quotas",
        "metering_prices",
        "metering_usage_events",
    ):
        op.drop_table(table)

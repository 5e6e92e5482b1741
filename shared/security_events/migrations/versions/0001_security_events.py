"""The security-events ledger: refused calls per tenant, minute, method, reason and principal; RLS on Postgres.

Revision ID: 0001_security_events
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from shared.db.rls import enable_tenant_rls

revision = "0001_security_events"
down_revision = None
branch_labels = None
depends_on = None

TABLE = "bulkhead_security_events"
RETENTION_DAYS = 30


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("service", sa.String(32), nullable=False),
        sa.Column("bucket_start", sa.BigInteger, nullable=False),
        sa.Column("method", sa.String(200), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("principal_id", sa.String(64), nullable=False),
        sa.Column("count", sa.BigInteger, nullable=False),
        sa.Column("last_seen_us", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint(
            "tenant_id",
            "service",
            "bucket_start",
            "method",
            "reason",
            "principal_id",
            name="pk_bulkhead_security_events",
        ),
    )
    op.create_index("ix_bulkhead_security_events_bucket_start", TABLE, ["bucket_start"])
    enable_tenant_rls(TABLE)
    if op.get_bind().dialect.name == "postgresql":
        # The retention sweep names no tenant; the database itself confines it to rows past retention
        # (a DELETE with a WHERE clause must also see the rows, hence the SELECT policy).
        sweeper = (
            f"current_setting('app.tenant_id', true) = 'security-events-retention' "
            f"AND bucket_start < CAST(extract(epoch FROM now()) AS bigint) - {RETENTION_DAYS * 86400}"
        )
        op.execute(f"CREATE POLICY retention_sweep_read ON {TABLE} FOR SELECT USING ({sweeper})")
        op.execute(f"CREATE POLICY retention_sweep ON {TABLE} FOR DELETE USING ({sweeper})")


def downgrade() -> None:
    op.drop_table(TABLE)

"""State tables: threads, labels, events, snapshots, context, data keys, audit; with RLS on Postgres.

Revision ID: 0001_state_tables
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from shared.db.rls import enable_tenant_rls

revision = "0001_state_tables"
down_revision = None
branch_labels = None
depends_on = None

_AUDIT_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TABLES = (
    "state_threads",
    "state_thread_labels",
    "state_events",
    "state_snapshots",
    "state_context",
    "state_data_keys",
    "state_audit",
)


def _tenant() -> sa.Column:
    return sa.Column("tenant_id", sa.String(64), nullable=False)


def upgrade() -> None:
    op.create_table(
        "state_threads",
        sa.Column("thread_id", sa.String(64), nullable=False),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("agent_id", sa.String(128), nullable=False),
        sa.Column("labels_json", sa.Text(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.Column("updated_at_us", sa.BigInteger(), nullable=False),
        _tenant(),
        sa.PrimaryKeyConstraint("tenant_id", "thread_id", name="pk_state_threads"),
    )
    op.create_index("ix_state_threads_run", "state_threads", ["tenant_id", "run_id", "thread_id"])
    op.create_index("ix_state_threads_agent", "state_threads", ["tenant_id", "agent_id", "thread_id"])

    op.create_table(
        "state_thread_labels",
        sa.Column("thread_id", sa.String(64), nullable=False),
        sa.Column("key", sa.String(63), nullable=False),
        sa.Column("value", sa.String(128), nullable=False),
        _tenant(),
        sa.PrimaryKeyConstraint("tenant_id", "thread_id", "key", name="pk_state_thread_labels"),
    )
    op.create_index("ix_state_thread_labels_kv", "state_thread_labels", ["tenant_id", "key", "value", "thread_id"])

    op.create_table(
        "state_events",
        sa.Column("thread_id", sa.String(64), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        _tenant(),
        sa.PrimaryKeyConstraint("tenant_id", "thread_id", "version", name="pk_state_events"),
    )

    op.create_table(
        "state_snapshots",
        sa.Column("thread_id", sa.String(64), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        _tenant(),
        sa.PrimaryKeyConstraint("tenant_id", "thread_id", "version", name="pk_state_snapshots"),
    )

    op.create_table(
        "state_context",
        sa.Column("scope_kind", sa.Integer(), nullable=False),
        sa.Column("scope_id", sa.String(128), nullable=False),
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.Column("expires_at_us", sa.BigInteger(), nullable=True),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("updated_at_us", sa.BigInteger(), nullable=False),
        _tenant(),
        sa.PrimaryKeyConstraint("tenant_id", "scope_kind", "scope_id", "key", name="pk_state_context"),
    )

    op.create_table(
        "state_data_keys",
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("wrapped", sa.LargeBinary(), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        _tenant(),
        sa.PrimaryKeyConstraint("tenant_id", "key_id", name="pk_state_data_keys"),
    )

    op.create_table(
        "state_audit",
        sa.Column("id", _AUDIT_ID, autoincrement=True, nullable=False),
        sa.Column("principal_id", sa.String(128), nullable=False),
        sa.Column("actor_id", sa.String(128), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(512), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("at_us", sa.BigInteger(), nullable=False),
        _tenant(),
        sa.PrimaryKeyConstraint("id", name="pk_state_audit"),
    )
    op.create_index("ix_state_audit_at", "state_audit", ["tenant_id", "at_us"])

    for table in TABLES:
        # The TenantOwned mixin's own index; every key above already leads with tenant_id.
        op.create_index(f"ix_{table}_tenant_id", table, ["tenant_id"])
        enable_tenant_rls(table)


def downgrade() -> None:
    for table in reversed(TABLES):
        op.drop_table(table)

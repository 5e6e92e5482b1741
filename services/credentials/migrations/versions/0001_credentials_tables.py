"""Credentials tables: secret metadata, versions, audit chain, local-backend keys and values, schedule.

Revision ID: 0001_credentials_tables
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from shared.db.rls import enable_tenant_rls

revision = "0001_credentials_tables"
down_revision = None
branch_labels = None
depends_on = None

TENANT_TABLES = (
    "cred_secrets",
    "cred_secret_versions",
    "cred_audit_events",
    "cred_audit_heads",
    "cred_local_keys",
    "cred_local_values",
)


def _id() -> sa.Column:
    return sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True)


def _tenant() -> sa.Column:
    return sa.Column("tenant_id", sa.String(64), nullable=False, index=True)


def _us(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.BigInteger(), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "cred_secrets",
        _id(),
        _tenant(),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("description", sa.String(1024), nullable=False),
        sa.Column("current_version", sa.BigInteger(), nullable=False),
        sa.Column("rotation_period_s", sa.BigInteger(), nullable=True),
        sa.Column("rotator", sa.String(64), nullable=False),
        _us("next_rotation_us", True),
        sa.Column("grace_period_s", sa.BigInteger(), nullable=False),
        _us("created_us"),
        _us("updated_us"),
        _us("deleted_us", True),
        sa.UniqueConstraint("tenant_id", "name", name="uq_cred_secrets_tenant_id"),
    )
    op.create_table(
        "cred_secret_versions",
        _id(),
        _tenant(),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        _us("created_us"),
        _us("expire_us", True),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("origin", sa.String(80), nullable=False),
        sa.UniqueConstraint("tenant_id", "name", "version", name="uq_cred_secret_versions_tenant_id"),
    )
    op.create_table(
        "cred_audit_events",
        _id(),
        _tenant(),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        _us("time_us"),
        *(
            sa.Column(c, sa.String(128), nullable=False)
            for c in ("principal_id", "actor_id", "agent_id", "run_id", "request_id", "secret_name")
        ),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.UniqueConstraint("tenant_id", "seq", name="uq_cred_audit_events_tenant_id"),
    )
    op.create_index("ix_cred_audit_events_secret", "cred_audit_events", ["tenant_id", "secret_name", "action"])
    op.create_table(
        "cred_audit_heads",
        _id(),
        _tenant(),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.UniqueConstraint("tenant_id", name="uq_cred_audit_heads_tenant_id"),
    )
    op.create_table(
        "cred_local_keys",
        _id(),
        _tenant(),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("wrapped", sa.LargeBinary(), nullable=False),
        _us("created_us"),
        sa.UniqueConstraint("tenant_id", "purpose", "version", name="uq_cred_local_keys_tenant_id"),
    )
    op.create_table(
        "cred_local_values",
        _id(),
        _tenant(),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("key_version", sa.Integer(), nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.UniqueConstraint("tenant_id", "name", "version", name="uq_cred_local_values_tenant_id"),
    )
    op.create_table(
        "cred_schedule",
        _id(),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("tier", sa.String(16), nullable=False),
        sa.Column("secret_name", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        _us("due_us"),
        sa.UniqueConstraint("tenant_id", "secret_name", "kind", name="uq_cred_schedule_tenant_id"),
    )
    op.create_index("ix_cred_schedule_due_us", "cred_schedule", ["due_us"])
    for table in TENANT_TABLES:
        enable_tenant_rls(table)


def downgrade() -> None:
    for table in ("cred_schedule", *reversed(TENANT_TABLES)):
        op.drop_table(table)

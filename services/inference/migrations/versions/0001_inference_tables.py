"""Inference tables: policies and private models (tenant-owned, RLS) and the usage outbox.

Revision ID: 0001_inference_tables
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from shared.db.rls import enable_tenant_rls

revision = "0001_inference_tables"
down_revision = None
branch_labels = None
depends_on = None

_ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "inference_policies",
        sa.Column("id", _ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("allowed_models", sa.Text(), nullable=False),
        sa.Column("default_model", sa.String(100), nullable=False),
        sa.Column("pinned_versions", sa.Text(), nullable=False),
        sa.Column("max_tokens_ceiling", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("tenant_id", name="uq_inference_policies_tenant"),
    )
    op.create_index("ix_inference_policies_tenant_id", "inference_policies", ["tenant_id"])
    op.create_table(
        "inference_private_models",
        sa.Column("id", _ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("upstream_model", sa.String(200), nullable=False),
        sa.Column("base_url", sa.String(500), nullable=False),
        sa.Column("lineage", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("tenant_id", "name", name="uq_inference_private_models_name"),
    )
    op.create_index("ix_inference_private_models_tenant_id", "inference_private_models", ["tenant_id"])
    op.create_table(
        "inference_usage_outbox",
        sa.Column("id", _ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_inference_usage_outbox_tenant_id", "inference_usage_outbox", ["tenant_id"])
    enable_tenant_rls("inference_policies")
    enable_tenant_rls("inference_private_models")


def downgrade() -> None:
    op.drop_table("inference_usage_outbox")
    op.drop_table("inference_private_models")
    op.drop_table("inference_policies")

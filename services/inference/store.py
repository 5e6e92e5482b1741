"""The inference proxy's tables: model policies, private models, and the usage outbox.

Policies and private models are tenant-owned (ORM criteria + RLS). The outbox is a platform
table: the proxy alone reads it, to deliver usage to metering in order; no RPC exposes it.
No grpc imports.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence

from sqlalchemy import (
    BigInteger,
    Integer,
    String,
    Text,
    UniqueConstraint,
    delete,
    select,
)
from sqlalchemy.orm import Mapped, mapped_column

from services.inference.budget import Tokens
from services.inference.policy import Policy, PrivateModel
from services.inference.usage import UsageEvent
from shared.db import Base, Database, TenantOwned

_ROW_ID = BigInteger().with_variant(Integer(), "sqlite")


class InferenceBase(Base):
    """The declarative base of the inference proxy's own tables."""


class PolicyRow(InferenceBase, TenantOwned):
    """A tenant's model policy (one row per tenant)."""

    __tablename__ = "inference_policies"
    __table_args__ = (UniqueConstraint("tenant_id", name="uq_inference_policies_tenant"),)

    id: Mapped[int] = mapped_column(_ROW_ID, primary_key=True, autoincrement=True)
    allowed_models: Mapped[str] = mapped_column(Text, default="[]")
    default_model: Mapped[str] = mapped_column(String(100), default="")
    pinned_versions: Mapped[str] = mapped_column(Text, default="{}")
    max_tokens_ceiling: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[float] = mapped_column(BigInteger)


class PrivateModelRow(InferenceBase, TenantOwned):
    """A model only its tenant may call."""

    __tablename__ = "inference_private_models"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_inference_private_models_name"),)

    id: Mapped[int] = mapped_column(_ROW_ID, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100))
    upstream_model: Mapped[str] = mapped_column(String(200))
    base_url: Mapped[str] = mapped_column(String(500), default="")
    lineage: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[int] = mapped_column(BigInteger)


class OutboxRow(InferenceBase):
    """Usage not yet acknowledged by metering; delivered oldest first (by id) per tenant."""

    __tablename__ = "inference_usage_outbox"

    id: Mapped[int] = mapped_column(_ROW_ID, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[int] = mapped_column(BigInteger)


def _iso(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class PolicyStore:
    """Reads and writes policies and private models of the current tenant."""

    def __init__(self, db: Database):
        self._db = db

    async def policy(self) -> Policy:
        """The current tenant's stored policy (empty when none is set)."""
        async with self._db.session() as s:
            row = (await s.execute(select(PolicyRow))).scalar_one_or_none()
        if row is None:
            return Policy()
        return Policy(tuple(json.loads(row.allowed_models)), row.default_model, json.loads(row.pinned_versions),
                      row.max_tokens_ceiling)

    async def put_policy(self, policy: Policy) -> None:
        """Replace the current tenant's policy."""
        async with self._db.session() as s:
            row = (await s.execute(select(PolicyRow))).scalar_one_or_none()
            if row is None:
                row = PolicyRow()
                s.add(row)
            row.allowed_models = json.dumps(list(policy.allowed_models))
            row.default_model = policy.default_model
            row.pinned_versions = json.dumps(policy.pinned_versions, sort_keys=True)
            row.max_tokens_ceiling = policy.max_tokens_ceiling
            row.updated_at = int(time.time())

    async def private_models(self) -> dict[str, PrivateModel]:
        """The current tenant's private models, by name."""
        async with self._db.session() as s:
            rows = (await s.execute(select(PrivateModelRow).order_by(PrivateModelRow.name))).scalars().all()
        return {r.name: _private(r) for r in rows}

    async def add_private_model(self, model: PrivateModel) -> PrivateModel | None:
        """Register a private model; None when the tenant already has one by that name."""
        async with self._db.session() as s:
            taken = (await s.execute(select(PrivateModelRow.id).where(PrivateModelRow.name == model.name))).first()
            if taken is not None:
                return None
            row = PrivateModelRow(name=model.name, upstream_model=model.upstream_model, base_url=model.base_url,
                                  lineage=model.lineage, created_at=int(time.time()))
            s.add(row)
        return _private(row)

    async def list_private_models(self, *, after: str, limit: int) -> list[PrivateModel]:
        """A page of the current tenant's private models with names after `after`."""
        async with self._db.session() as s:
            rows = (await s.execute(select(PrivateModelRow).where(PrivateModelRow.name > after)
                                    .order_by(PrivateModelRow.name).limit(limit))).scalars().all()
        return [_private(r) for r in rows]


def _private(row: PrivateModelRow) -> PrivateModel:
    return PrivateModel(row.name, row.upstream_model, row.base_url, row.lineage, _iso(row.created_at))


class SqlOutbox:
    """The durable usage outbox (implements usage.Outbox)."""

    def __init__(self, db: Database):
        self._db = db

    async def append(self, events: Sequence[UsageEvent]) -> None:
        """Persist events in order."""
        now = int(time.time())
        async with self._db.system_session() as s:
            s.add_all([OutboxRow(tenant_id=e.tenant_id, payload=_dump(e), created_at=now) for e in events])

    async def pending(self, tenant_id: str, limit: int) -> list[tuple[int, UsageEvent]]:
        """The tenant's oldest undelivered events."""
        async with self._db.system_session() as s:
            rows = (await s.execute(select(OutboxRow).where(OutboxRow.tenant_id == tenant_id)
                                    .order_by(OutboxRow.id).limit(limit))).scalars().all()
        return [(r.id, _load(r.payload)) for r in rows]

    async def delete(self, ids: Sequence[int]) -> None:
        """Forget delivered events."""
        async with self._db.system_session() as s:
            await s.execute(delete(OutboxRow).where(OutboxRow.id.in_(list(ids))))

    async def tenants(self) -> set[str]:
        """Tenants with undelivered events."""
        async with self._db.system_session() as s:
            return set((await s.execute(select(OutboxRow.tenant_id).distinct())).scalars().all())

    async def count(self) -> int:
        """Undelivered events of every tenant."""
        async with self._db.system_session() as s:
            return len((await s.execute(select(OutboxRow.id))).all())


def _dump(e: UsageEvent) -> str:
    t = e.tokens
    return json.dumps({"tenant_id": e.tenant_id, "idempotency_key": e.idempotency_key, "principal_id": e.principal_id,
                       "agent_id": e.agent_id, "run_id": e.run_id, "model": e.model,
                       "tokens": [t.input, t.output, t.cache_write, t.cache_read], "latency_ms": e.latency_ms,
                       "outcome": e.outcome, "occurred_at": e.occurred_at, "trace_id": e.trace_id, "tier": e.tier})


def _load(payload: str) -> UsageEvent:
    d = json.loads(payload)
    return UsageEvent(**{**d, "tokens": Tokens(*d["tokens"])})

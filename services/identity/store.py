"""identity's tables. Tenants, signing keys and the revocation feed are platform tables;
principals, API keys and issued tokens belong to one tenant each. At the end, the raw statements of
its hot paths (ExchangeToken's record, the revocation feed every service polls)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base, Database, TenantOwned
from shared.db.raw import RawTransaction, autocommit_fetch, raw_transaction


class IdentityBase(Base):
    """identity's own metadata."""


class TenantRow(IdentityBase):
    """A customer of the platform (a platform table: operators list them all)."""

    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    tier: Mapped[str] = mapped_column(String(16))
    region: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    audit_retention_days: Mapped[int | None] = mapped_column(Integer, nullable=True, default=None)
    """Days audit events are kept (shared.retention); None: the default."""
    usage_detail_retention_days: Mapped[int | None] = mapped_column(Integer, nullable=True, default=None)
    """Days per-event usage detail is kept; None: the default."""


class PrincipalRow(IdentityBase, TenantOwned):
    """A user, service account or agent of one tenant."""

    __tablename__ = "principals"
    __table_args__ = (UniqueConstraint("tenant_id", "display_name"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(24))
    display_name: Mapped[str] = mapped_column(String(128))
    scopes: Mapped[list[str]] = mapped_column(JSON)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApiKeyRow(IdentityBase, TenantOwned):
    """An API key: only a hash of its secret is kept."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    principal_id: Mapped[str] = mapped_column(String(64), index=True)
    prefix: Mapped[str] = mapped_column(String(96))
    secret_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    scopes: Mapped[list[str]] = mapped_column(JSON)
    display_name: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class IssuedTokenRow(IdentityBase, TenantOwned):
    """A token identity signed, so its tenant (and only its tenant) can revoke it by jti."""

    __tablename__ = "issued_tokens"
    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    principal_id: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class RevocationRow(IdentityBase):
    """The public revocation feed verifiers poll: opaque token ids only, no tenant."""

    __tablename__ = "revocations"
    revision: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    jti: Mapped[str] = mapped_column(String(64), unique=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class SigningKeyRow(IdentityBase):
    """A token-signing key; the private half is stored encrypted under the key-encryption key."""

    __tablename__ = "signing_keys"
    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_key: Mapped[bytes] = mapped_column(LargeBinary(32))
    encrypted_private_key: Mapped[bytes] = mapped_column(LargeBinary)
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class DeletionRow(IdentityBase):
    """A tenant's deletion plan (a platform table): kept after it is done, with the signed receipt."""

    __tablename__ = "tenant_deletions"
    tenant_id: Mapped[str] = mapped_column("target_tenant", String(64), primary_key=True)
    tier: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))  # scheduled | running | done
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    delete_after: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    receipt_body: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    receipt_signature: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    receipt_kid: Mapped[str | None] = mapped_column(String(64), nullable=True)


class DeletionStepRow(IdentityBase):
    """One service's step of a deletion: what it held before (inventory) and what its purge returned."""

    __tablename__ = "tenant_deletion_steps"
    tenant_id: Mapped[str] = mapped_column("target_tenant", String(64), primary_key=True)
    service: Mapped[str] = mapped_column(String(32), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    done: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(String(300), default="")
    inventory: Mapped[str | None] = mapped_column(Text, nullable=True)
    """JSON of InventoryTenantResponse, written once before the first purge attempt (counts only)."""
    result: Mapped[str | None] = mapped_column(Text, nullable=True)
    """JSON of the PurgeTenantResponse that completed the step."""


class MigrationRow(IdentityBase):
    """A tenant's live tier migration (a platform table: the coordinator's durable record, one per tenant;
    a new migration of the same tenant replaces a finished one)."""

    __tablename__ = "tenant_migrations"
    tenant_id: Mapped[str] = mapped_column("target_tenant", String(64), primary_key=True)
    source_tier: Mapped[str] = mapped_column(String(16))
    target_tier: Mapped[str] = mapped_column(String(16))
    source_region: Mapped[str] = mapped_column(String(32), default="")
    """The tenant's region when the migration was planned ("" in plans made before regions could move)."""
    target_region: Mapped[str] = mapped_column(String(32), default="")
    """The region it moves to (the source region when only the tier changes; "" as source_region)."""
    state: Mapped[str] = mapped_column(String(16))
    """copying | releasing | done | aborting | aborted (the tenant's tier in `tenants` changes between
    copying and releasing, in the transaction that ends copying)."""
    generation: Mapped[int] = mapped_column(Integer, default=0)
    """The tenant's placement generation after this migration's switch (0 before it)."""
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    pause_ms: Mapped[int] = mapped_column(Integer, default=0)
    """How long the tenant's requests were paused: first copy to last switch (the last attempt's)."""
    last_error: Mapped[str] = mapped_column(String(300), default="")


class MigrationStepRow(IdentityBase):
    """One service's part of a migration: its copy (with the verified inventories), switch and release."""

    __tablename__ = "tenant_migration_steps"
    tenant_id: Mapped[str] = mapped_column("target_tenant", String(64), primary_key=True)
    service: Mapped[str] = mapped_column(String(32), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    phase: Mapped[str] = mapped_column(String(16), default="pending")
    """pending | copied | switched | released (or, aborting: reverted | released)."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(String(300), default="")
    verify: Mapped[str | None] = mapped_column(Text, nullable=True)
    """JSON of the VerifyTenantResponse that let the copy count (rows and checksums, both sides)."""
    released: Mapped[str | None] = mapped_column(Text, nullable=True)
    """JSON of the ReleaseTenantResponse."""


# Raw statements on identity's hot paths, next to their ORM twins above (shared.db.raw).
_SQLITE_DATETIME = sqlite.DATETIME().bind_processor(sqlite.dialect())
"""How the ORM writes a DateTime on SQLite (one text format, which comparisons and reads rely on)."""
_SQLITE_READ_DATETIME = sqlite.DATETIME().result_processor(sqlite.dialect(), None)
"""How the ORM reads that text back (a naive datetime, stored as UTC: see signing.as_utc)."""

# ExchangeToken's issued-token row: written on every agent run.
_RECORD_ISSUED = "INSERT INTO issued_tokens (jti, tenant_id, principal_id, expires_at) VALUES ($1, $2, $3, $4)"
_RECORD_ISSUED_PG = (
    "INSERT INTO issued_tokens (jti, tenant_id, principal_id, expires_at) "
    "SELECT $1, t.tid, $3, $4 FROM (SELECT set_config('app.tenant_id', $2, true) AS tid) AS t"
)
"""Postgres, one statement as its own implicit transaction: the row's tenant_id is what set_config returns, so
app.tenant_id is set (for this statement's transaction only) before the row exists, and RLS checks it as ever."""


async def record_issued(db: Database, *, tenant_id: str, jti: str, principal_id: str, expires_at: datetime) -> None:
    """IssuedTokenRow(jti, principal_id, expires_at) of `tenant_id`, without the ORM: ExchangeToken runs on every
    agent run. One round trip on Postgres (db.raw() spends three on it). identity's rows are pooled whatever the
    tenant's tier (directory.pooled), so the route is the pooled one, as db.session() under pooled() takes."""
    async with db.router.using(tenant_id, "pooled") as route:
        if route.bind.dialect.name == "postgresql" and route.schema is None:
            await autocommit_fetch(route.bind, _RECORD_ISSUED_PG, jti, tenant_id, principal_id, expires_at)
            return
        async with raw_transaction(route.bind, tenant_id=tenant_id, schema=route.schema, write=True) as tx:
            when = _SQLITE_DATETIME(expires_at) if tx.dialect == "sqlite" and _SQLITE_DATETIME else expires_at
            await tx.execute(_RECORD_ISSUED, jti, tenant_id, principal_id, when)


# The revocation feed every other service polls each second (ListRevokedTokens), read without the ORM: its
# three ORM sessions cost several times the statements they ran. Platform tables only (no tenant, no RLS).
_REVOCATIONS_AFTER = "SELECT revision, jti, expires_at FROM revocations WHERE revision > $1 ORDER BY revision"
_NOT_ACTIVE = (
    "SELECT t.id, t.status, d.completed_at FROM tenants AS t "
    "LEFT OUTER JOIN tenant_deletions AS d ON d.target_tenant = t.id WHERE t.status != 'active'"
)
_MIGRATIONS = (
    "SELECT m.target_tenant, m.state, m.generation, t.tier, m.completed_at, t.region "
    "FROM tenant_migrations AS m JOIN tenants AS t ON t.id = m.target_tenant"
)
_STEPS_IN_PHASES = "SELECT DISTINCT target_tenant FROM tenant_migration_steps WHERE phase IN ({})"


@asynccontextmanager
async def platform_reads(db: Database) -> AsyncIterator[RawTransaction]:
    """One raw transaction on the platform database (as system_session(): no tenant, so RLS shows no tenant row)."""
    async with raw_transaction(db.engine, tenant_id=None) as tx:
        yield tx


def _when(value: Any) -> Any:
    """A DateTime column's value (or None) as the ORM reads it: SQLite hands back the ORM's text."""
    if isinstance(value, str) and _SQLITE_READ_DATETIME is not None:
        return _SQLITE_READ_DATETIME(value)
    return value


async def revocation_rows(tx: RawTransaction, since: int) -> list[tuple[int, str, datetime]]:
    """(revision, jti, expires_at) of revocations after revision `since`, in revision order."""
    rows = await tx.fetch(_REVOCATIONS_AFTER, since)
    return [(int(r[0]), r[1], _when(r[2])) for r in rows]


async def not_active_rows(tx: RawTransaction) -> list[tuple[str, str, datetime | None]]:
    """(tenant id, status, its deletion's completed_at or None) of every tenant that is not active."""
    return [(r[0], r[1], _when(r[2])) for r in await tx.fetch(_NOT_ACTIVE)]


async def migration_rows(
    tx: RawTransaction, phases: Sequence[str]
) -> tuple[list[tuple[str, str, int, str, datetime | None, str]], set[str]]:
    """(tenant, state, generation, tenant's tier, completed_at, tenant's region) of every tier migration, and
    the tenants with a step in one of `phases`."""
    rows = [(r[0], r[1], int(r[2]), r[3], _when(r[4]), r[5]) for r in await tx.fetch(_MIGRATIONS)]
    marks = ", ".join(f"${i}" for i in range(1, len(phases) + 1))
    steps = {r[0] for r in await tx.fetch(_STEPS_IN_PHASES.format(marks), *phases)} if phases else set()
    return rows, steps

"""The credentials service's tables and queries (SQLAlchemy 2, no grpc).

Times are integer microseconds since the epoch: identical on SQLite and Postgres, and stable
inside audit hashes. No table ever holds a secret value in plaintext.
"""

from __future__ import annotations

import sqlite3
import time

from sqlalchemy import (
    BigInteger,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    delete,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base, TenantOwned
from shared.db.raw import RawTransaction, sqlite_sql
from shared.lifecycle import REGION_MAIN


def now_us() -> int:
    """The current time in epoch microseconds."""
    return time.time_ns() // 1000


class CredentialsBase(Base):
    """The credentials service's tables."""


class SecretRow(CredentialsBase, TenantOwned):
    """A secret's metadata (never its value)."""

    __tablename__ = "cred_secrets"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    description: Mapped[str] = mapped_column(String(1024), default="")
    current_version: Mapped[int] = mapped_column(BigInteger, default=0)
    rotation_period_s: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    rotator: Mapped[str] = mapped_column(String(64), default="random")
    next_rotation_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    grace_period_s: Mapped[int] = mapped_column(BigInteger, default=0)
    created_us: Mapped[int] = mapped_column(BigInteger)
    updated_us: Mapped[int] = mapped_column(BigInteger)
    deleted_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class VersionRow(CredentialsBase, TenantOwned):
    """One version of a secret: state and lifetime (never its value)."""

    __tablename__ = "cred_secret_versions"
    __table_args__ = (UniqueConstraint("tenant_id", "name", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16))  # current | previous | deleted | destroyed
    created_us: Mapped[int] = mapped_column(BigInteger)
    expire_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_by: Mapped[str] = mapped_column(String(128), default="")
    origin: Mapped[str] = mapped_column(String(80), default="put")


class AuditRow(CredentialsBase, TenantOwned):
    """One audited access, hash-chained per tenant; append-only."""

    __tablename__ = "cred_audit_events"
    __table_args__ = (
        UniqueConstraint("tenant_id", "seq"),
        # The audit listing of one secret (ListAccessEvents by secret_name).
        Index("ix_cred_audit_events_secret", "tenant_id", "secret_name", "action"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    time_us: Mapped[int] = mapped_column(BigInteger)
    principal_id: Mapped[str] = mapped_column(String(128), default="")
    actor_id: Mapped[str] = mapped_column(String(128), default="")
    agent_id: Mapped[str] = mapped_column(String(128), default="")
    run_id: Mapped[str] = mapped_column(String(128), default="")
    request_id: Mapped[str] = mapped_column(String(128), default="")
    secret_name: Mapped[str] = mapped_column(String(128), default="")
    version: Mapped[int] = mapped_column(BigInteger, default=0)
    action: Mapped[str] = mapped_column(String(32))
    outcome: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(64), default="")
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHeadRow(CredentialsBase, TenantOwned):
    """The last sequence and hash of a tenant's chain: removing the newest rows is detectable."""

    __tablename__ = "cred_audit_heads"
    __table_args__ = (UniqueConstraint("tenant_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))
    anchor_seq: Mapped[int] = mapped_column(BigInteger, server_default="0", default=0)
    """Retention anchor (shared.retention): events up to this sequence were pruned; 0: none."""
    anchor_hash: Mapped[str] = mapped_column(String(64), server_default="0" * 64, default="0" * 64)
    """The last pruned event's hash: the oldest kept event's prev_hash."""
    anchor_time_us: Mapped[int] = mapped_column(BigInteger, server_default="0", default=0)
    """When the last pruned event was written."""


class LocalKeyRow(CredentialsBase, TenantOwned):
    """A version of a tenant's key for the local backend, wrapped by the master key."""

    __tablename__ = "cred_local_keys"
    __table_args__ = (UniqueConstraint("tenant_id", "purpose", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    purpose: Mapped[str] = mapped_column(String(16))  # "kv" or "transit"
    version: Mapped[int] = mapped_column(Integer)
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    created_us: Mapped[int] = mapped_column(BigInteger)


class LocalValueRow(CredentialsBase, TenantOwned):
    """A secret version's value for the local backend: AES-GCM sealed under the tenant's kv key."""

    __tablename__ = "cred_local_values"
    __table_args__ = (UniqueConstraint("tenant_id", "name", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(BigInteger)
    key_version: Mapped[int] = mapped_column(Integer)
    sealed: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # None once destroyed
    state: Mapped[str] = mapped_column(String(16), default="live")  # live | deleted | destroyed


class ScheduleRow(CredentialsBase):
    """Background work due for a tenant's secret (platform table: no values, read by the scheduler)."""

    __tablename__ = "cred_schedule"
    # Data residency: a tenant's jobs (secret names) live in its region's main database, whatever its tier;
    # the scheduler reads every region's, and deletion purges them there (shared.lifecycle.REGION_MAIN).
    __table_args__ = (UniqueConstraint("tenant_id", "secret_name", "kind"), {"info": {REGION_MAIN: True}})
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    tier: Mapped[str] = mapped_column(String(16), default="pooled")
    secret_name: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))  # "rotate" or "expire"
    due_us: Mapped[int] = mapped_column(BigInteger, index=True)


# -- queries ----------------------------------------------------------------------------------


async def get_secret(s: AsyncSession, name: str) -> SecretRow | None:
    """The tenant's secret by name (the session filters by tenant)."""
    return (await s.execute(select(SecretRow).where(SecretRow.name == name))).scalar_one_or_none()


async def list_secrets(s: AsyncSession, *, after: str, limit: int, show_deleted: bool) -> list[SecretRow]:
    """Secrets ordered by name, strictly after `after`."""
    q = select(SecretRow).where(SecretRow.name > after).order_by(SecretRow.name).limit(limit)
    if not show_deleted:
        q = q.where(SecretRow.deleted_us.is_(None))
    return list((await s.execute(q)).scalars())


async def versions_of(s: AsyncSession, name: str) -> list[VersionRow]:
    """Every version row of a secret, oldest first."""
    q = select(VersionRow).where(VersionRow.name == name).order_by(VersionRow.version)
    return list((await s.execute(q)).scalars())


async def delete_secret_rows(s: AsyncSession, name: str) -> None:
    """Remove a secret's metadata and version rows (after DestroySecret)."""
    await s.execute(delete(VersionRow).where(VersionRow.name == name))
    await s.execute(delete(SecretRow).where(SecretRow.name == name))


async def set_schedule(s: AsyncSession, *, tenant_id: str, tier: str, name: str, kind: str, due_us: int | None) -> None:
    """Create, move or clear (due_us=None) one background job for a secret."""
    row = (
        await s.execute(
            select(ScheduleRow).where(
                ScheduleRow.tenant_id == tenant_id, ScheduleRow.secret_name == name, ScheduleRow.kind == kind
            )
        )
    ).scalar_one_or_none()
    if due_us is None:
        if row is not None:
            await s.delete(row)
    elif row is None:
        s.add(ScheduleRow(tenant_id=tenant_id, tier=tier, secret_name=name, kind=kind, due_us=due_us))
    else:
        row.due_us, row.tier = due_us, tier


async def due_jobs(s: AsyncSession, *, now: int, limit: int) -> list[ScheduleRow]:
    """Jobs due by `now`, oldest first (read in a system session: platform table)."""
    q = select(ScheduleRow).where(ScheduleRow.due_us <= now).order_by(ScheduleRow.due_us).limit(limit)
    return list((await s.execute(q)).scalars())


async def audit_head(s: AsyncSession) -> AuditHeadRow | None:
    """The tenant's chain head."""
    return (await s.execute(select(AuditHeadRow))).scalar_one_or_none()


async def audit_page(s: AsyncSession, *, after_seq: int, limit: int, secret_name: str = "") -> list[AuditRow]:
    """Audit rows in sequence order, strictly after `after_seq`."""
    q = select(AuditRow).where(AuditRow.seq > after_seq).order_by(AuditRow.seq).limit(limit)
    if secret_name:
        q = q.where(AuditRow.secret_name == secret_name)
    return list((await s.execute(q)).scalars())


# -- raw SQL for the audit append (the GetSecret hot path) ---------------------------------------
# One short transaction instead of an ORM session: through db.raw on Postgres (row-level security
# still applies as the app role), in the SqliteWriter's thread on SQLite. Every statement names
# tenant_id itself (SQLite has no row-level security).

AUDIT_COLUMNS = (
    "seq",
    "time_us",
    "principal_id",
    "actor_id",
    "agent_id",
    "run_id",
    "request_id",
    "secret_name",
    "version",
    "action",
    "outcome",
    "reason",
    "prev_hash",
    "hash",
)
"""The columns of an audit row after tenant_id, in the order the append functions expect them."""

_INSERT_AUDIT = (
    f"INSERT INTO cred_audit_events (tenant_id, {', '.join(AUDIT_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(AUDIT_COLUMNS) + 2))})"
)
_AUDIT_HEAD = "SELECT seq, hash FROM cred_audit_heads WHERE tenant_id = $1"
_FIRST_HEAD = "INSERT INTO cred_audit_heads (tenant_id, seq, hash) VALUES ($1, $2, $3)"
_MOVE_HEAD = "UPDATE cred_audit_heads SET seq = $1, hash = $2 WHERE tenant_id = $3 AND seq = $4"
# A racing first writer of a chain hits the unique constraint on tenant_id (_FIRST_HEAD) or on
# (tenant_id, seq) (the events); a later one finds the head moved (_MOVE_HEAD changes no row).


async def raw_audit_head(tx: RawTransaction, tenant_id: str) -> tuple[int, str] | None:
    """The tenant's chain head as (seq, hash), or None before its first event."""
    row = await tx.fetchrow(_AUDIT_HEAD, tenant_id)
    return (int(row[0]), str(row[1])) if row is not None else None


async def raw_append_audit(tx: RawTransaction, tenant_id: str, rows: list[tuple], *, head_seq: int) -> bool:
    """Insert rows (AUDIT_COLUMNS order, contiguous after head_seq) and move the head onto the last one.

    False when the head is no longer at head_seq (another writer appended): the caller rolls back.
    """
    await tx.executemany(_INSERT_AUDIT, [(tenant_id, *row) for row in rows])
    seq, digest = rows[-1][0], rows[-1][-1]
    if head_seq == 0:
        await tx.execute(_FIRST_HEAD, tenant_id, seq, digest)
        return True
    return await tx.execute(_MOVE_HEAD, seq, digest, tenant_id, head_seq) == 1


_SQLITE_AUDIT_HEAD = sqlite_sql(_AUDIT_HEAD)
_SQLITE_FIRST_HEAD = sqlite_sql(_FIRST_HEAD)
_SQLITE_MOVE_HEAD = sqlite_sql(_MOVE_HEAD)
_SQLITE_INSERT_AUDIT = f"INSERT INTO cred_audit_events (tenant_id, {', '.join(AUDIT_COLUMNS)}) VALUES "
_SQLITE_AUDIT_ROW = "(" + ", ".join("?" * (len(AUDIT_COLUMNS) + 1)) + ")"
SQLITE_ROWS_PER_INSERT = 64
"""Rows per INSERT statement of a SQLite append (64 x 15 parameters, far below SQLite's limit; few statement texts)."""


def sqlite_audit_head(conn: sqlite3.Connection, tenant_id: str) -> tuple[int, str] | None:
    """raw_audit_head on a plain sqlite3 connection (the SqliteWriter's)."""
    row = conn.execute(_SQLITE_AUDIT_HEAD, (tenant_id,)).fetchone()
    return (int(row[0]), str(row[1])) if row is not None else None


def sqlite_append_audit(conn: sqlite3.Connection, tenant_id: str, rows: list[tuple], *, head_seq: int) -> bool:
    """raw_append_audit on a plain sqlite3 connection (the SqliteWriter's).

    A batch goes in as one multi-row INSERT (per SQLITE_ROWS_PER_INSERT rows) rather than executemany's
    statement step per row (each step releases and retakes the GIL).
    """
    for start in range(0, len(rows), SQLITE_ROWS_PER_INSERT):
        chunk = rows[start : start + SQLITE_ROWS_PER_INSERT]
        conn.execute(
            _SQLITE_INSERT_AUDIT + ", ".join([_SQLITE_AUDIT_ROW] * len(chunk)),
            [value for row in chunk for value in (tenant_id, *row)],
        )
    seq, digest = rows[-1][0], rows[-1][-1]
    if head_seq == 0:
        conn.execute(_SQLITE_FIRST_HEAD, (tenant_id, seq, digest))
        return True
    return conn.execute(_SQLITE_MOVE_HEAD, (seq, digest, tenant_id, head_seq)).rowcount == 1


def is_unique_violation(exc: BaseException) -> bool:
    """Whether a driver error (sqlite3 or asyncpg, as raw transactions raise them) is a unique violation."""
    if isinstance(exc, (IntegrityError, sqlite3.IntegrityError)):
        return True
    return getattr(exc, "sqlstate", None) == "23505"  # asyncpg's UniqueViolationError

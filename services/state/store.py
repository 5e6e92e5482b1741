"""The state service's tables and queries (SQLAlchemy 2, no grpc).

Every table is tenant-owned: shared.db adds the tenant criteria to every ORM statement and
Postgres row-level security backs it up. Keys lead with tenant_id, so each query the RPCs make is
an index range scan.
"""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    Index,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    and_,
    delete,
    exists,
    func,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base, Database, TenantOwned
from shared.tenancy import require_tenant

_sqlite_writers: weakref.WeakKeyDictionary[Database, asyncio.Lock] = weakref.WeakKeyDictionary()


@asynccontextmanager
async def write_session(db: Database) -> AsyncIterator[AsyncSession]:
    """A tenant session for a write transaction.

    SQLite has one writer at a time and its busy handler backs off by sleeping, so concurrent
    writers in this process queue on a lock instead; Postgres needs no such thing (row locks).
    """
    if db.dialect != "sqlite":
        async with db.session() as s:
            yield s
        return
    lock = _sqlite_writers.setdefault(db, asyncio.Lock())
    async with lock, db.session() as s:
        yield s


def now_us() -> int:
    """Wall-clock time in microseconds since the epoch (portable across SQLite and Postgres)."""
    return time.time_ns() // 1000


class StateBase(Base):
    """The declarative base of the state service's own tables."""


class ThreadRow(StateBase, TenantOwned):
    """A thread: its version is the number of events appended."""

    __tablename__ = "state_threads"
    __table_args__ = (
        PrimaryKeyConstraint("tenant_id", "thread_id"),
        # ListThreads filtered by run or agent, in thread_id order.
        Index("ix_state_threads_run", "tenant_id", "run_id", "thread_id"),
        Index("ix_state_threads_agent", "tenant_id", "agent_id", "thread_id"),
    )

    thread_id: Mapped[str] = mapped_column(String(64))
    run_id: Mapped[str] = mapped_column(String(128), default="")
    agent_id: Mapped[str] = mapped_column(String(128), default="")
    labels_json: Mapped[str] = mapped_column(Text, default="{}")
    version: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at_us: Mapped[int] = mapped_column(BigInteger)
    updated_at_us: Mapped[int] = mapped_column(BigInteger)


class LabelRow(StateBase, TenantOwned):
    """One label of a thread, kept apart so label filters use an index."""

    __tablename__ = "state_thread_labels"
    __table_args__ = (
        PrimaryKeyConstraint("tenant_id", "thread_id", "key"),
        # The EXISTS of a label filter.
        Index("ix_state_thread_labels_kv", "tenant_id", "key", "value", "thread_id"),
    )

    thread_id: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(63))
    value: Mapped[str] = mapped_column(String(128))


class EventRow(StateBase, TenantOwned):
    """One event; payload is ciphertext sealed with the data key `key_id`."""

    __tablename__ = "state_events"
    __table_args__ = (PrimaryKeyConstraint("tenant_id", "thread_id", "version"),)

    thread_id: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(BigInteger)
    event_type: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str] = mapped_column(String(32))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    created_at_us: Mapped[int] = mapped_column(BigInteger)


class SnapshotRow(StateBase, TenantOwned):
    """A materialised state of a thread at a version; state is ciphertext."""

    __tablename__ = "state_snapshots"
    __table_args__ = (PrimaryKeyConstraint("tenant_id", "thread_id", "version"),)

    thread_id: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(BigInteger)
    key_id: Mapped[str] = mapped_column(String(32))
    state: Mapped[bytes] = mapped_column(LargeBinary)
    created_at_us: Mapped[int] = mapped_column(BigInteger)


class ContextRow(StateBase, TenantOwned):
    """A context value; revision only ever grows (also across expiry), so compare-and-set has no ABA."""

    __tablename__ = "state_context"
    __table_args__ = (PrimaryKeyConstraint("tenant_id", "scope_kind", "scope_id", "key"),)

    scope_kind: Mapped[int] = mapped_column(Integer)
    scope_id: Mapped[str] = mapped_column(String(128))
    key: Mapped[str] = mapped_column(String(128))
    revision: Mapped[int] = mapped_column(BigInteger)
    key_id: Mapped[str] = mapped_column(String(32))
    value: Mapped[bytes] = mapped_column(LargeBinary)
    expires_at_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at_us: Mapped[int] = mapped_column(BigInteger)


class DataKeyRow(StateBase, TenantOwned):
    """A tenant's data key, wrapped by its key-encryption key; the plain key is never stored."""

    __tablename__ = "state_data_keys"
    __table_args__ = (PrimaryKeyConstraint("tenant_id", "key_id"),)

    key_id: Mapped[str] = mapped_column(String(32))
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    created_at_us: Mapped[int] = mapped_column(BigInteger)


class AuditRow(StateBase, TenantOwned):
    """Who changed what, at which version; written in the transaction of the change."""

    __tablename__ = "state_audit"
    __table_args__ = (Index("ix_state_audit_at", "tenant_id", "at_us"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    principal_id: Mapped[str] = mapped_column(String(128))
    actor_id: Mapped[str] = mapped_column(String(128), default="")
    request_id: Mapped[str] = mapped_column(String(128), default="")
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(512))
    version: Mapped[int] = mapped_column(BigInteger, default=0)
    at_us: Mapped[int] = mapped_column(BigInteger)


# --- threads ---------------------------------------------------------------------------------


async def get_thread(s: AsyncSession, thread_id: str) -> ThreadRow | None:
    """The thread, if the current tenant has it."""
    return (await s.execute(select(ThreadRow).where(ThreadRow.thread_id == thread_id))).scalar_one_or_none()


async def insert_thread(
    s: AsyncSession, thread_id: str, run_id: str, agent_id: str, labels: dict[str, str]
) -> ThreadRow:
    """Add a thread at version 0 with its labels."""
    at, tenant = now_us(), require_tenant().tenant_id
    row = ThreadRow(
        tenant_id=tenant,
        thread_id=thread_id,
        run_id=run_id,
        agent_id=agent_id,
        labels_json=json.dumps(labels, sort_keys=True),
        version=0,
        created_at_us=at,
        updated_at_us=at,
    )
    s.add(row)
    s.add_all(LabelRow(tenant_id=tenant, thread_id=thread_id, key=k, value=v) for k, v in labels.items())
    await s.flush()
    return row


async def list_threads(
    s: AsyncSession, *, run_id: str, agent_id: str, labels: dict[str, str], after_thread_id: str, limit: int
) -> Sequence[ThreadRow]:
    """Threads matching every given filter, in thread_id order, after a position."""
    q = select(ThreadRow).where(ThreadRow.thread_id > after_thread_id)
    if run_id:
        q = q.where(ThreadRow.run_id == run_id)
    if agent_id:
        q = q.where(ThreadRow.agent_id == agent_id)
    for key, value in labels.items():
        q = q.where(
            exists().where(
                and_(
                    LabelRow.tenant_id == ThreadRow.tenant_id,
                    LabelRow.thread_id == ThreadRow.thread_id,
                    LabelRow.key == key,
                    LabelRow.value == value,
                )
            )
        )
    return (await s.execute(q.order_by(ThreadRow.thread_id).limit(limit))).scalars().all()


async def advance_version(s: AsyncSession, thread_id: str, count: int, expected: int | None) -> int | None:
    """Move the thread's version on by `count`, only from `expected` when given.

    One conditional UPDATE: on Postgres it takes the row lock, so concurrent appenders queue and
    every one after the winner sees the new version and matches nothing. Returns the new
    version, or None when the thread is missing or not at `expected`.
    """
    q = update(ThreadRow).where(ThreadRow.thread_id == thread_id)
    if expected is not None:
        q = q.where(ThreadRow.version == expected)
    q = q.values(version=ThreadRow.version + count, updated_at_us=now_us()).returning(ThreadRow.version)
    return (await s.execute(q, execution_options={"synchronize_session": False})).scalar_one_or_none()


async def current_version(s: AsyncSession, thread_id: str) -> int | None:
    """The thread's version, or None when the tenant has no such thread."""
    q = select(ThreadRow.version).where(ThreadRow.thread_id == thread_id)
    return (await s.execute(q)).scalar_one_or_none()


async def insert_events(s: AsyncSession, rows: list[dict]) -> None:
    """Add events in one batched INSERT (rows carry tenant_id explicitly; RLS checks it)."""
    await s.execute(cast(Table, EventRow.__table__).insert(), rows)


async def read_events(s: AsyncSession, thread_id: str, after: int, up_to: int | None, limit: int) -> Sequence[EventRow]:
    """Events after a version (up to another, when given), in version order."""
    q = select(EventRow).where(EventRow.thread_id == thread_id, EventRow.version > after)
    if up_to is not None:
        q = q.where(EventRow.version <= up_to)
    return (await s.execute(q.order_by(EventRow.version).limit(limit))).scalars().all()


async def delete_thread(s: AsyncSession, thread_id: str) -> None:
    """Remove a thread with its labels, events and snapshots."""
    for model in (EventRow, SnapshotRow, LabelRow, ThreadRow):
        await s.execute(
            delete(model).where(model.thread_id == thread_id), execution_options={"synchronize_session": False}
        )


# --- snapshots -------------------------------------------------------------------------------


async def get_snapshot(s: AsyncSession, thread_id: str, at_or_before: int | None) -> SnapshotRow | None:
    """The newest snapshot of a thread, at or before a version when given."""
    q = select(SnapshotRow).where(SnapshotRow.thread_id == thread_id)
    if at_or_before is not None:
        q = q.where(SnapshotRow.version <= at_or_before)
    return (await s.execute(q.order_by(SnapshotRow.version.desc()).limit(1))).scalar_one_or_none()


async def snapshot_exists(s: AsyncSession, thread_id: str, version: int) -> bool:
    """Whether a snapshot at exactly this version is stored."""
    q = (
        select(func.count())
        .select_from(SnapshotRow)
        .where(SnapshotRow.thread_id == thread_id, SnapshotRow.version == version)
    )
    return bool((await s.execute(q)).scalar_one())


# --- context ---------------------------------------------------------------------------------


async def get_context(
    s: AsyncSession, kind: int, scope_id: str, key: str, *, for_update: bool = False
) -> ContextRow | None:
    """The context row (live, expired or deleted), if any."""
    q = select(ContextRow).where(ContextRow.scope_kind == kind, ContextRow.scope_id == scope_id, ContextRow.key == key)
    if for_update:
        q = q.with_for_update()
    return (await s.execute(q)).scalar_one_or_none()


async def replace_context(
    s: AsyncSession, kind: int, scope_id: str, key: str, seen_revision: int, values: dict
) -> bool:
    """Overwrite a context row only if it is still at `seen_revision`; False when it moved on."""
    q = (
        update(ContextRow)
        .where(
            ContextRow.scope_kind == kind,
            ContextRow.scope_id == scope_id,
            ContextRow.key == key,
            ContextRow.revision == seen_revision,
        )
        .values(**values)
        .returning(ContextRow.revision)
    )
    return (await s.execute(q, execution_options={"synchronize_session": False})).scalar_one_or_none() is not None


# --- audit -----------------------------------------------------------------------------------


def audit(s: AsyncSession, action: str, target: str, version: int = 0) -> None:
    """Record who did `action` on `target` in the session's transaction."""
    ctx = require_tenant()
    s.add(
        AuditRow(
            tenant_id=ctx.tenant_id,
            principal_id=ctx.principal_id,
            actor_id=ctx.actor_id or "",
            request_id=ctx.request_id,
            action=action,
            target=target,
            version=version,
            at_us=now_us(),
        )
    )


# --- data keys -------------------------------------------------------------------------------


class DataKeyStore:
    """The current tenant's wrapped data keys (envelope.WrappedKeyStore), each call its own transaction."""

    def __init__(self, db: Database):
        self._db = db

    async def newest_key(self) -> tuple[str, bytes] | None:
        async with self._db.session() as s:
            q = select(DataKeyRow).order_by(DataKeyRow.created_at_us.desc(), DataKeyRow.key_id).limit(1)
            row = (await s.execute(q)).scalar_one_or_none()
            return None if row is None else (row.key_id, row.wrapped)

    async def get_key(self, key_id: str) -> bytes | None:
        async with self._db.session() as s:
            q = select(DataKeyRow.wrapped).where(DataKeyRow.key_id == key_id)
            return (await s.execute(q)).scalar_one_or_none()

    async def add_key(self, key_id: str, wrapped: bytes) -> None:
        async with write_session(self._db) as s:
            s.add(
                DataKeyRow(tenant_id=require_tenant().tenant_id, key_id=key_id, wrapped=wrapped, created_at_us=now_us())
            )
            audit(s, "datakey.create", key_id)

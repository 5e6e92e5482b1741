"""Threads: append-only, encrypted event logs with optimistic concurrency, snapshots and replay."""

from __future__ import annotations

import builtins
import json
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence

from services.state import store, validation
from services.state.envelope import Envelope, PlaintextEnvelope, TenantKey
from services.state.records import (
    EventRecord,
    Limits,
    NewEventRecord,
    SnapshotRecord,
    ThreadRecord,
)
from shared import paging
from shared.db import Database
from shared.errors import Aborted, AlreadyExists, InvalidArgument, NotFound
from shared.tenancy import require_tenant


def event_aad(tenant_id: str, thread_id: str, version: int) -> bytes:
    """Binds an event's ciphertext to its tenant, thread and version."""
    return f"state.event\0{tenant_id}\0{thread_id}\0{version}".encode()


def snapshot_aad(tenant_id: str, thread_id: str, version: int) -> bytes:
    """Binds a snapshot's ciphertext to its tenant, thread and version."""
    return f"state.snapshot\0{tenant_id}\0{thread_id}\0{version}".encode()


def new_thread_id() -> str:
    """A generated thread id that sorts by creation time."""
    return f"th_{time.time_ns():016x}{os.urandom(4).hex()}"


def thread_not_found(thread_id: str) -> NotFound:
    """The same answer whether the thread never existed or belongs to another tenant."""
    return NotFound(f"thread {thread_id!r} not found", reason="THREAD_NOT_FOUND")


class ThreadLog:
    """The thread operations of the state service, for the current tenant."""

    def __init__(self, db: Database, envelope: Envelope | PlaintextEnvelope, limits: Limits):
        self._db = db
        self._envelope = envelope
        self._limits = limits

    async def create(self, *, thread_id: str, run_id: str, agent_id: str, labels: Mapping[str, str]) -> ThreadRecord:
        """Start an empty thread; ALREADY_EXISTS when the tenant already has that id."""
        thread_id = validation.thread_id(thread_id) if thread_id else new_thread_id()
        run_id = validation.reference(run_id, "run_id")
        agent_id = validation.reference(agent_id, "agent_id")
        labels = validation.labels(labels, self._limits)
        async with store.write_session(self._db) as s:
            if await store.get_thread(s, thread_id) is not None:
                raise AlreadyExists(f"thread {thread_id!r} already exists", reason="THREAD_EXISTS")
            row = await store.insert_thread(s, thread_id, run_id, agent_id, labels)
            store.audit(s, "thread.create", thread_id)
            return _thread(row)

    async def get(self, thread_id: str) -> ThreadRecord:
        """A thread's metadata and version."""
        validation.thread_id(thread_id)
        async with self._db.session() as s:
            row = await store.get_thread(s, thread_id)
            if row is None:
                raise thread_not_found(thread_id)
            return _thread(row)

    async def list(
        self, *, run_id: str, agent_id: str, labels: Mapping[str, str], page_size: int, page_token: str
    ) -> paging.Page[ThreadRecord]:
        """Threads matching the filters, in thread_id order, one page at a time."""
        run_id = validation.reference(run_id, "run_id")
        agent_id = validation.reference(agent_id, "agent_id")
        labels = validation.labels(labels, self._limits)
        size = paging.page_size(page_size, default=self._limits.default_page_size, maximum=self._limits.max_page_size)
        filters = (run_id, agent_id, sorted(labels.items()))
        after = paging.decode(page_token, filters=filters) or ""
        if not isinstance(after, str):
            raise paging.invalid_token()
        async with self._db.read_session() as s:  # a replica, when configured
            rows = await store.list_threads(
                s, run_id=run_id, agent_id=agent_id, labels=labels, after_thread_id=after, limit=size + 1
            )
        page = paging.keyset(rows, size, lambda r: r.thread_id, filters=filters)
        return paging.Page([_thread(r) for r in page.items], page.next_page_token)

    async def delete(self, thread_id: str, expected_version: int | None) -> None:
        """Remove a thread, its events and snapshots (only at expected_version when given)."""
        validation.thread_id(thread_id)
        if expected_version is not None:
            validation.version(expected_version, "expected_version")
        async with store.write_session(self._db) as s:
            # Taking the version through the conditional UPDATE locks the row against appends.
            version = await store.advance_version(s, thread_id, 0, expected_version)
            if version is None:
                raise await self._missing_or_conflict(s, thread_id, expected_version)
            await store.delete_thread(s, thread_id)
            store.audit(s, "thread.delete", thread_id, version)

    async def append(
        self, thread_id: str, events: Sequence[NewEventRecord], expected_version: int | None
    ) -> tuple[int, int]:
        """Append events; returns (first, last) version. ABORTED with the current version on conflict."""
        validation.thread_id(thread_id)
        if expected_version is not None:
            validation.version(expected_version, "expected_version")
        validation.new_events(events, self._limits)
        key = await self._envelope.current_key()
        tenant = require_tenant().tenant_id
        async with store.write_session(self._db) as s:
            last = await store.advance_version(s, thread_id, len(events), expected_version)
            if last is None:
                raise await self._missing_or_conflict(s, thread_id, expected_version)
            first = last - len(events) + 1
            at = store.now_us()
            sealed = key.seal_many(
                [(event_aad(tenant, thread_id, v), e.payload) for v, e in enumerate(events, start=first)]
            )
            await store.insert_events(
                s,
                [
                    {
                        "tenant_id": tenant,
                        "thread_id": thread_id,
                        "version": v,
                        "event_type": e.type,
                        "key_id": key.key_id,
                        "payload": blob,
                        "created_at_us": at,
                    }
                    for v, e, blob in zip(range(first, last + 1), events, sealed, strict=True)
                ],
            )
            store.audit(s, "thread.append", thread_id, last)
        return first, last

    async def read(
        self, thread_id: str, *, after_version: int, page_size: int, page_token: str
    ) -> tuple[paging.Page[EventRecord], int]:
        """A page of events after a version, decrypted, in version order, and the thread's version."""
        validation.thread_id(thread_id)
        after = validation.version(after_version, "after_version")
        size = paging.page_size(page_size, default=self._limits.default_page_size, maximum=self._limits.max_page_size)
        if page_token:
            after = paging.decode(page_token, filters=thread_id)
            if type(after) is not int or after < 0:
                raise paging.invalid_token()
        async with self._db.read_session() as s:  # a replica, when configured
            version = await store.current_version(s, thread_id)
            if version is None:
                raise thread_not_found(thread_id)
            rows = await store.read_events(s, thread_id, after, None, size)
        events = await self._open_events(thread_id, rows)
        more = bool(events) and events[-1].version < version
        token = paging.encode(events[-1].version, filters=thread_id) if more else ""
        return paging.Page(events, token), version

    async def replay(
        self, thread_id: str, *, up_to_version: int, from_snapshot: bool
    ) -> AsyncIterator[SnapshotRecord | EventRecord]:
        """The thread's events in order (after a snapshot, when asked), up to a version.

        Validation and the existence check happen before the first item, so errors surface as
        the stream's status rather than midway.
        """
        validation.thread_id(thread_id)
        up_to = validation.version(up_to_version, "up_to_version")
        async with self._db.session() as s:
            version = await store.current_version(s, thread_id)
            if version is None:
                raise thread_not_found(thread_id)
            if up_to > version:
                raise InvalidArgument(
                    f"up_to_version {up_to} is beyond the thread's version {version}",
                    reason="VERSION_OUT_OF_RANGE",
                    violations={"up_to_version": "beyond the thread's version"},
                    metadata={"current_version": str(version)},
                )
            up_to = up_to or version
            snapshot = await store.get_snapshot(s, thread_id, up_to) if from_snapshot else None
        return self._stream(thread_id, up_to, snapshot)

    async def _stream(
        self, thread_id: str, up_to: int, snapshot: store.SnapshotRow | None
    ) -> AsyncIterator[SnapshotRecord | EventRecord]:
        after = 0
        if snapshot is not None:
            yield await self._open_snapshot(snapshot)
            after = snapshot.version
        while after < up_to:
            # One short transaction per batch: a long replay never pins a connection or a lock.
            async with self._db.session() as s:
                rows = await store.read_events(s, thread_id, after, up_to, self._limits.replay_batch)
            if not rows:
                return  # deleted while replaying
            for event in await self._open_events(thread_id, rows):
                yield event
            after = rows[-1].version

    async def create_snapshot(self, thread_id: str, version: int, state: bytes) -> SnapshotRecord:
        """Store the materialised state as of `version` (1..the thread's version)."""
        validation.thread_id(thread_id)
        validation.version(version, "version")
        if version == 0:
            raise validation.invalid("version", "version must be at least 1", "INVALID_VERSION")
        validation.snapshot_state(state, self._limits)
        key = await self._envelope.current_key()
        tenant = require_tenant().tenant_id
        async with store.write_session(self._db) as s:
            current = await store.current_version(s, thread_id)
            if current is None:
                raise thread_not_found(thread_id)
            if version > current:
                raise InvalidArgument(
                    f"version {version} is beyond the thread's version {current}",
                    reason="VERSION_OUT_OF_RANGE",
                    violations={"version": "beyond the thread's version"},
                    metadata={"current_version": str(current)},
                )
            if await store.snapshot_exists(s, thread_id, version):
                raise AlreadyExists(f"a snapshot at version {version} exists", reason="SNAPSHOT_EXISTS")
            row = store.SnapshotRow(
                tenant_id=tenant,
                thread_id=thread_id,
                version=version,
                key_id=key.key_id,
                state=key.seal(snapshot_aad(tenant, thread_id, version), state),
                created_at_us=store.now_us(),
            )
            s.add(row)
            store.audit(s, "snapshot.create", thread_id, version)
        return SnapshotRecord(thread_id, version, state, row.created_at_us)

    async def get_snapshot(self, thread_id: str, at_or_before_version: int) -> SnapshotRecord:
        """The newest snapshot at or before a version (0: the newest)."""
        validation.thread_id(thread_id)
        at = validation.version(at_or_before_version, "at_or_before_version")
        async with self._db.session() as s:
            if await store.current_version(s, thread_id) is None:
                raise thread_not_found(thread_id)
            row = await store.get_snapshot(s, thread_id, at or None)
        if row is None:
            raise NotFound(
                f"no snapshot of thread {thread_id!r} at or before that version", reason="SNAPSHOT_NOT_FOUND"
            )
        return await self._open_snapshot(row)

    async def _missing_or_conflict(self, s, thread_id: str, expected: int | None) -> Exception:
        current = await store.current_version(s, thread_id)
        if current is None:
            return thread_not_found(thread_id)
        return Aborted(
            f"thread {thread_id!r} is at version {current}, not {expected}",
            reason="VERSION_CONFLICT",
            metadata={"current_version": str(current)},
        )

    async def _open_events(self, thread_id: str, rows: Sequence[store.EventRow]) -> builtins.list[EventRecord]:
        tenant = require_tenant().tenant_id
        keys: dict[str, TenantKey] = await self._envelope.keys({r.key_id for r in rows})
        return [
            EventRecord(
                r.version,
                r.event_type,
                keys[r.key_id].open(event_aad(tenant, thread_id, r.version), r.payload),
                r.created_at_us,
            )
            for r in rows
        ]

    async def _open_snapshot(self, row: store.SnapshotRow) -> SnapshotRecord:
        tenant = require_tenant().tenant_id
        key = await self._envelope.key(row.key_id)
        state = key.open(snapshot_aad(tenant, row.thread_id, row.version), row.state)
        return SnapshotRecord(row.thread_id, row.version, state, row.created_at_us)


def _thread(row: store.ThreadRow) -> ThreadRecord:
    return ThreadRecord(
        row.thread_id,
        row.run_id,
        row.agent_id,
        json.loads(row.labels_json),
        row.version,
        row.created_at_us,
        row.updated_at_us,
    )

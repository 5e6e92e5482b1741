"""Shared context: an encrypted key-value space per team or run, with compare-and-set and TTL."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError

from services.state import store, validation
from services.state.envelope import Envelope, PlaintextEnvelope
from services.state.records import ContextRecord, Limits, ScopeKind
from shared.db import Database
from shared.errors import Aborted, NotFound
from shared.tenancy import require_tenant

MAX_TTL_US = 100 * 366 * 24 * 3600 * 1_000_000
"""The longest TTL, a century: protobuf's longest Durations would overflow the 64-bit expiry column."""


def context_aad(tenant_id: str, kind: int, scope_id: str, key: str, revision: int) -> bytes:
    """Binds a value's ciphertext to its tenant, scope, key and revision."""
    return f"state.context\0{tenant_id}\0{kind}\0{scope_id}\0{key}\0{revision}".encode()


def context_not_found(key: str) -> NotFound:
    """The same answer for a missing, expired, deleted or other tenant's key."""
    return NotFound(f"context key {key!r} not found", reason="CONTEXT_NOT_FOUND")


def revision_conflict(key: str, current: int) -> Aborted:
    """A compare-and-set that lost: carries the revision to read again from."""
    return Aborted(
        f"context key {key!r} is at revision {current}",
        reason="REVISION_CONFLICT",
        metadata={"current_revision": str(current)},
    )


def _live_revision(row: store.ContextRow | None, now: int) -> int:
    """The revision a caller can see: 0 for a key that is absent, deleted or expired."""
    if row is None or row.deleted or (row.expires_at_us is not None and row.expires_at_us <= now):
        return 0
    return row.revision


class ContextStore:
    """Context operations for the current tenant."""

    def __init__(self, db: Database, envelope: Envelope | PlaintextEnvelope, limits: Limits):
        self._db = db
        self._envelope = envelope
        self._limits = limits

    async def put(
        self, kind: int, scope_id: str, key: str, value: bytes, *, expected_revision: int | None, ttl_us: int | None
    ) -> ContextRecord:
        """Write a value; with expected_revision, only if the visible revision is that (0 = absent)."""
        kind = _scope_kind(kind)
        validation.scope_id(scope_id)
        validation.context_key(key)
        validation.context_value(value, self._limits)
        if expected_revision is not None and expected_revision < 0:
            raise validation.invalid("expected_revision", "expected_revision must not be negative", "INVALID_REVISION")
        if ttl_us is not None and ttl_us <= 0:
            raise validation.invalid("ttl", "ttl must be positive", "INVALID_TTL")
        if ttl_us is not None and ttl_us > MAX_TTL_US:
            raise validation.invalid("ttl", "ttl must be at most a century", "INVALID_TTL")
        sealer = await self._envelope.current_key()
        tenant = require_tenant().tenant_id
        try:
            async with store.write_session(self._db) as s:
                now = store.now_us()
                row = await store.get_context(s, kind, scope_id, key, for_update=True)
                if expected_revision is not None and expected_revision != _live_revision(row, now):
                    raise revision_conflict(key, _live_revision(row, now))
                # Revisions keep growing through expiry and deletion, so an old revision never matches again.
                revision = 1 if row is None else row.revision + 1
                expires_at_us = None if ttl_us is None else now + ttl_us
                values = {
                    "revision": revision,
                    "key_id": sealer.key_id,
                    "deleted": False,
                    "value": sealer.seal(context_aad(tenant, kind, scope_id, key, revision), value),
                    "expires_at_us": expires_at_us,
                    "updated_at_us": now,
                }
                if row is None:
                    s.add(store.ContextRow(tenant_id=tenant, scope_kind=kind, scope_id=scope_id, key=key, **values))
                    await s.flush()
                elif not await store.replace_context(s, kind, scope_id, key, row.revision, values):
                    raise revision_conflict(key, revision)
                store.audit(s, "context.put", _target(kind, scope_id, key), revision)
        except IntegrityError:
            # A concurrent writer created the key first: a compare-and-set loser like any other.
            raise revision_conflict(key, 1) from None
        return ContextRecord(ScopeKind(kind), scope_id, key, value, revision, expires_at_us, now)

    async def get(self, kind: int, scope_id: str, key: str) -> ContextRecord:
        """A live value; NOT_FOUND when absent, deleted or expired."""
        kind = _scope_kind(kind)
        validation.scope_id(scope_id)
        validation.context_key(key)
        async with self._db.session() as s:
            row = await store.get_context(s, kind, scope_id, key)
        if row is None or not _live_revision(row, store.now_us()):
            raise context_not_found(key)
        opener = await self._envelope.key(row.key_id)
        value = opener.open(context_aad(require_tenant().tenant_id, kind, scope_id, key, row.revision), row.value)
        return ContextRecord(ScopeKind(kind), scope_id, key, value, row.revision, row.expires_at_us, row.updated_at_us)

    async def delete(self, kind: int, scope_id: str, key: str, *, expected_revision: int | None) -> None:
        """Delete a live value (leaving a tombstone that keeps its revision)."""
        kind = _scope_kind(kind)
        validation.scope_id(scope_id)
        validation.context_key(key)
        if expected_revision is not None and expected_revision < 0:
            raise validation.invalid("expected_revision", "expected_revision must not be negative", "INVALID_REVISION")
        async with store.write_session(self._db) as s:
            now = store.now_us()
            row = await store.get_context(s, kind, scope_id, key, for_update=True)
            live = _live_revision(row, now)
            if row is None or not live:
                raise context_not_found(key)
            if expected_revision is not None and expected_revision != live:
                raise revision_conflict(key, live)
            tombstone = {
                "revision": row.revision + 1,
                "deleted": True,
                "value": b"",
                "key_id": "",
                "expires_at_us": None,
                "updated_at_us": now,
            }
            if not await store.replace_context(s, kind, scope_id, key, row.revision, tombstone):
                raise revision_conflict(key, row.revision + 1)
            store.audit(s, "context.delete", _target(kind, scope_id, key), row.revision + 1)


def _scope_kind(kind: int) -> int:
    if kind not in ScopeKind.__members__.values():
        raise validation.invalid("scope.kind", "scope.kind must be TEAM or RUN", "INVALID_SCOPE")
    return int(kind)


def _target(kind: int, scope_id: str, key: str) -> str:
    return f"{ScopeKind(kind).name.lower()}/{scope_id}/{key}"

"""The access audit: every call on a secret or key, allowed or not, appended to a per-tenant
hash chain (shared.audit_chain). It records who, tenant, agent, run, secret, version, action,
outcome and time, never a value.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import operator
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sqlalchemy import func, select

from services.credentials import store
from services.credentials.sqlite_inline import Busy, InlineSqlite
from services.credentials.sqlite_writer import SqliteWriter
from shared import audit_chain, errors
from shared.config_audit import Anchor
from shared.db import Database
from shared.db.engine import sqlite_path
from shared.retention import BATCH, Policy, prune_chain_prefix
from shared.tenancy import NoTenantContext, require_tenant

ALLOWED, DENIED, NOT_FOUND, CONFLICT, INVALID, FAILED = (
    "allowed",
    "denied",
    "not_found",
    "conflict",
    "invalid",
    "failed",
)

_HASHED = store.AUDIT_COLUMNS[:-2]
"""The fields each link's hash covers: every audit column but the two hashes."""
_HASHED_VALUES = operator.itemgetter(*_HASHED)
"""An event's hashed fields as a tuple, in store.AUDIT_COLUMNS order."""


def outcome_of(exc: BaseException) -> str:
    """The audit outcome for an error a call ended with."""
    if isinstance(exc, errors.NotFound):
        return NOT_FOUND
    if isinstance(exc, errors.PermissionDenied) or getattr(exc, "reason", "") == "DECRYPTION_FAILED":
        return DENIED
    if isinstance(exc, (errors.Aborted, errors.FailedPrecondition, errors.AlreadyExists)):
        return CONFLICT
    if isinstance(exc, errors.InvalidArgument):
        return INVALID
    return FAILED


def hashed_fields(row: store.AuditRow) -> dict[str, object]:
    """Exactly the fields the chain hash covers."""
    return {name: getattr(row, name) for name in _HASHED}


APPEND_BUDGET_S = 2.0
"""How long an append keeps retrying a head other replicas moved before the call fails UNAVAILABLE (which
a channel resends for an idempotent read such as GetSecret)."""
_FIRST_BACKOFF_S, _MAX_BACKOFF_S = 0.005, 0.1

GATHER_TURNS = 16
"""At most this many more loop turns a batch waits for while the loop has other callbacks ready (see _drain)."""

HOLD_SECONDS = 0.001
"""Under concurrent reads, how long a batch may wait for the events its recent predecessors say are coming."""
RECENT_SECONDS = 0.25
"""How long the largest recent batch of a tenant stays the size its next batches wait for."""


class _StaleHead(Exception):
    """The chain head moved under us (another replica appended)."""


@dataclass
class AuditNote:
    """Filled in by the audited block: what the call ended up touching."""

    secret_name: str = ""
    version: int = 0
    authorized: asyncio.Future | None = None
    """Set by allow_early(): the ALLOWED event already being written while the block works."""


class AuditLog:
    """Appends to and verifies the tenant's chain."""

    def __init__(self, db: Database, chain_key: bytes = b"") -> None:
        """chain_key makes every link an HMAC: without it a forger cannot rebuild the chain."""
        self._db = db
        self._key = chain_key
        self._sqlite = SqliteWriter()
        self._inline = InlineSqlite()
        self._heads: dict[str, tuple[int, str]] = {}
        self._pending: dict[str, list[tuple[dict, asyncio.Future]]] = {}
        self._writers: dict[str, asyncio.Task] = {}
        self._recent: dict[str, tuple[int, float]] = {}  # tenant -> (largest recent batch, until when it counts)
        self._wakers: dict[str, tuple[int, asyncio.Future]] = {}  # tenant -> (batch size that wakes, waiter)
        self._paths: dict[object, str] = {}  # SQLite engine -> its file

    @contextlib.asynccontextmanager
    async def audited(self, action: str, secret_name: str = "") -> AsyncIterator[AuditNote]:
        """Audit the block's outcome: allowed when it returns, the error's outcome when it raises.

        The event is committed before the block's result reaches the caller, so a value is never
        handed out without its audit row.
        """
        note = AuditNote(secret_name)
        try:
            yield note
        except NoTenantContext:
            raise
        except errors.BulkheadError as exc:
            if note.authorized is not None:
                await note.authorized
            await self.record(
                action, outcome_of(exc), secret_name=note.secret_name, version=note.version, reason=exc.reason
            )
            raise
        except Exception:
            if note.authorized is not None:
                await note.authorized
            await self.record(action, FAILED, secret_name=note.secret_name, version=note.version, reason="INTERNAL")
            raise
        if note.authorized is not None:
            await note.authorized  # its failure fails the call: nothing leaves without its audit row
        else:
            await self.record(action, ALLOWED, secret_name=note.secret_name, version=note.version)

    def allow_early(self, note: AuditNote, action: str) -> None:
        """Start writing the ALLOWED event now, once the call is authorized, so the commit overlaps
        the backend fetch (like Vault's request-then-response audit entries). The call still waits
        for it before returning; if the fetch then fails, a second event records the failure."""
        note.authorized = asyncio.ensure_future(
            self.record(action, ALLOWED, secret_name=note.secret_name, version=note.version)
        )

    async def record(
        self, action: str, outcome: str, *, secret_name: str = "", version: int = 0, reason: str = ""
    ) -> None:
        """Append one event to the current tenant's chain; returns once it is committed.

        Group commit: events of one tenant that arrive while a write is in flight go into the
        next transaction together, so concurrent callers share one commit (each still waits
        for its own event to be durable).
        """
        ctx = require_tenant()
        fields = {
            "time_us": store.now_us(),
            "principal_id": ctx.principal_id,
            "actor_id": ctx.actor_id or "",
            "agent_id": ctx.agent_id or "",
            "run_id": ctx.run_id or "",
            "request_id": ctx.request_id,
            "secret_name": secret_name,
            "version": int(version),
            "action": action,
            "outcome": outcome,
            "reason": reason,
        }
        done = asyncio.get_running_loop().create_future()
        pending = self._pending.setdefault(ctx.tenant_id, [])
        pending.append((fields, done))
        waker = self._wakers.get(ctx.tenant_id)
        if waker is not None and len(pending) >= waker[0] and not waker[1].done():
            waker[1].set_result(None)  # the held batch is as large as expected: commit it now
        if ctx.tenant_id not in self._writers:
            # The task copies this context, so its sessions are bound to the same tenant.
            self._writers[ctx.tenant_id] = asyncio.ensure_future(self._drain(ctx.tenant_id))
        # Not shielded: a caller cancelled while waiting cancels only its wait; the writer still
        # commits its event (it skips futures already done).
        await done

    async def _drain(self, tenant_id: str) -> None:
        try:
            # One more turn of the loop before taking the first batch: the calls that arrived in the
            # same turn as this one add their events, and the lot shares one commit. Then, while the
            # loop has other callbacks ready (RPCs gRPC has just handed over, about to reach their own
            # event), a few more turns: the commit runs when the loop has nothing else to do, so calls
            # that arrive together under load share it, and an idle server commits at once. (Only
            # asyncio's own loop shows its ready queue; on another loop, one turn as before.) Last, under
            # concurrent reads, the hold: gRPC hands calls over a few hundred microseconds apart, with the
            # loop idle in between, so the batch also waits (briefly) for as many events as recent ones had.
            await asyncio.sleep(0)
            ready = getattr(asyncio.get_running_loop(), "_ready", None)
            for _ in range(GATHER_TURNS):
                if not ready:
                    break
                await asyncio.sleep(0)
            await self._hold(tenant_id)
            while self._pending.get(tenant_id):
                batch = self._pending.pop(tenant_id)
                self._note_batch(tenant_id, len(batch))
                try:
                    await self._append(tenant_id, [fields for fields, _ in batch])
                except Exception as exc:  # noqa: BLE001 - handed to every caller waiting on this batch
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                    continue
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)
        finally:
            self._writers.pop(tenant_id, None)

    async def _hold(self, tenant_id: str) -> None:
        """Under concurrent reads, wait (at most HOLD_SECONDS) until the batch is as large as the largest
        of the tenant's last RECENT_SECONDS: calls that gRPC hands over a few hundred microseconds apart
        then share one commit instead of paying one each. A tenant whose recent batches held one event
        (one caller at a time, an idle server) is never held."""
        expected, until = self._recent.get(tenant_id, (1, 0.0))
        loop = asyncio.get_running_loop()
        if loop.time() >= until:
            self._recent.pop(tenant_id, None)  # nothing recent: forget the tenant
            return
        if expected <= len(self._pending.get(tenant_id, ())):
            return
        wake = loop.create_future()
        self._wakers[tenant_id] = (expected, wake)
        timer = loop.call_later(HOLD_SECONDS, _wake, wake)
        try:
            await wake
        finally:
            timer.cancel()
            self._wakers.pop(tenant_id, None)

    def _note_batch(self, tenant_id: str, size: int) -> None:
        """Remember a batch's size: the largest of the last RECENT_SECONDS is what the next ones wait for."""
        now = asyncio.get_running_loop().time()
        expected, until = self._recent.get(tenant_id, (0, 0.0))
        if size >= expected or now >= until:
            if size <= 1:
                self._recent.pop(tenant_id, None)
            else:
                self._recent[tenant_id] = (size, now + RECENT_SECONDS)

    async def _append(self, tenant_id: str, batch: list[dict]) -> None:
        """Insert a batch after the chain head in one transaction (optimistic on the head).

        On SQLite the transaction runs on the loop's own thread when the file's write lock is free
        (sqlite_inline: no thread hop), else on the writer thread, which waits for the lock."""
        # Another replica may have moved the head: reread it and retry. Each loss means another writer
        # committed, so the chain always advances (no livelock) and a loss only costs a wait; retrying here,
        # within a time budget, means no caller sees the race (GetSecret never answers ABORTED for it).
        loop = asyncio.get_running_loop()
        give_up, backoff = loop.time() + APPEND_BUDGET_S, _FIRST_BACKOFF_S
        while True:
            head = self._heads.pop(tenant_id, None)  # back only after a commit: a failure rereads it
            try:
                if self._db.dialect == "sqlite":
                    bind = (await self._db.route()).bind
                    path = self._paths.get(bind) or self._paths.setdefault(bind, str(sqlite_path(bind.url)))
                    work = functools.partial(self._append_sqlite, tenant_id=tenant_id, head=head, batch=batch)
                    try:
                        head = self._inline.run(path, work)  # the lock is free: commit here, no thread hop
                    except Busy:
                        head = await self._sqlite.run(path, work)
                else:
                    head = await self._append_raw(tenant_id, head, batch)
            except Exception as exc:
                if not (isinstance(exc, _StaleHead) or store.is_unique_violation(exc)):
                    raise
                if loop.time() >= give_up:  # only under contention no replica should ever see
                    raise errors.Unavailable(
                        "the audit log is too busy to append to; retry",
                        reason="AUDIT_CONTENTION",
                        retry_after=APPEND_BUDGET_S,
                    ) from None
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))  # let the other writer finish first
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                continue
            self._heads[tenant_id] = head
            return

    async def _append_raw(self, tenant_id: str, head: tuple[int, str] | None, batch: list[dict]) -> tuple[int, str]:
        """The append as a raw transaction (Postgres: one round trip to begin, under RLS)."""
        async with self._db.raw(write=True) as tx:
            head = head or await store.raw_audit_head(tx, tenant_id) or (0, audit_chain.GENESIS)
            rows, new_head = self._link(head, batch)
            if not await store.raw_append_audit(tx, tenant_id, rows, head_seq=head[0]):
                raise _StaleHead()
        return new_head

    def _append_sqlite(
        self, conn, *, tenant_id: str, head: tuple[int, str] | None, batch: list[dict]
    ) -> tuple[int, str]:
        """The append as one unit of work in the SqliteWriter's thread (inside its transaction)."""
        head = head or store.sqlite_audit_head(conn, tenant_id) or (0, audit_chain.GENESIS)
        rows, new_head = self._link(head, batch)
        if not store.sqlite_append_audit(conn, tenant_id, rows, head_seq=head[0]):
            raise _StaleHead()
        return new_head

    def _link(self, head: tuple[int, str], batch: list[dict]) -> tuple[list[tuple], tuple[int, str]]:
        """The batch as chained rows (store.AUDIT_COLUMNS order) after head, and the new head."""
        seq, prev = head
        rows = []
        for fields in batch:
            seq += 1
            entry = {**fields, "seq": seq}
            digest = audit_chain.link(prev, entry, self._key)
            rows.append((*_HASHED_VALUES(entry), prev, digest))  # AUDIT_COLUMNS ends with prev_hash, hash
            prev = digest
        return rows, (seq, prev)

    async def close(self) -> None:
        """Release the SQLite writers (after the server stopped: no append is in flight)."""
        await self._inline.close()
        await self._sqlite.close()

    async def page(self, *, after_seq: int, limit: int, secret_name: str = "") -> list[store.AuditRow]:
        """Events of the current tenant in sequence order."""
        async with self._db.session() as s:
            rows = await store.audit_page(s, after_seq=after_seq, limit=limit, secret_name=secret_name)
            s.expunge_all()
            return rows

    async def last_access_us(self, secret_name: str) -> int | None:
        """When the secret's value was last read (from the audit itself: reads write no metadata)."""
        async with self._db.session() as s:
            return (
                await s.execute(
                    select(func.max(store.AuditRow.time_us)).where(
                        store.AuditRow.secret_name == secret_name,
                        store.AuditRow.action == "get",
                        store.AuditRow.outcome == ALLOWED,
                    )
                )
            ).scalar()

    async def verify(self, *, batch: int = 1000) -> audit_chain.ChainReport:
        """Recompute the current tenant's chain against its head, from its retention anchor."""
        return (await self.verify_anchored(batch=batch))[0]

    async def anchor(self) -> Anchor:
        """The current tenant's retention anchor (Anchor() while nothing was pruned)."""
        async with self._db.session() as s:
            head = await store.audit_head(s)
        return _anchor_of(head)

    async def verify_anchored(self, *, batch: int = 1000) -> tuple[audit_chain.ChainReport, Anchor]:
        """verify() and the anchor it started from (in one transaction: a sweeper pruning meanwhile is
        either wholly seen or not at all on Postgres; on SQLite the read holds the file's snapshot)."""
        async with self._db.session() as s:
            head = await store.audit_head(s)
            anchor = _anchor_of(head)
            entries: list[audit_chain.ChainEntry] = []
            after = anchor.sequence
            while True:
                rows = await store.audit_page(s, after_seq=after, limit=batch)
                if not rows:
                    break
                entries.extend(audit_chain.ChainEntry(r.seq, hashed_fields(r), r.prev_hash, r.hash) for r in rows)
                after = rows[-1].seq
        report = audit_chain.verify(
            entries,
            head_sequence=head.seq if head else 0,
            head_hash=head.hash if head else audit_chain.GENESIS,
            key=self._key,
            anchor_sequence=anchor.sequence,
            anchor_hash=anchor.hash,
        )
        return report, anchor

    async def prune(self, policy: Policy, now_us: int, *, batch: int = BATCH) -> int:
        """Retention (a shared.retention sweeper step): delete the tenant's access events older than its
        audit_days, oldest first, and move its chain's anchor to the last one deleted."""
        route = await self._db.router.existing(policy.tenant_id, policy.tier)
        if route is None:
            return 0
        total = 0
        while True:
            pruned, _ = await prune_chain_prefix(
                route,
                policy.tenant_id,
                events="cred_audit_events",
                heads="cred_audit_heads",
                cutoff_us=policy.audit_cutoff_us(now_us),
                batch=batch,
            )
            total += pruned
            if pruned < batch:
                return total


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _anchor_of(head: store.AuditHeadRow | None) -> Anchor:
    if head is None or not head.anchor_seq:
        return Anchor()
    return Anchor(int(head.anchor_seq), str(head.anchor_hash), int(head.anchor_time_us))

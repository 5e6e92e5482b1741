"""Write-ahead attempts: every upstream attempt is on disk before it is sent, and settled after.

    open   (awaited, before the upstream request)  -> row: tenant, request id, attempt n, model, reservation
    settle (queued, after the reply)               -> the row gets the provider's reported usage
    delivered (queued, once metering or the outbox holds the event) -> the row is done

The writes of all calls in flight share one transaction (group commit), so the hot path pays for one
row of an executemany, not one commit. Only opens wake the writer: settles and deliveries ride along
with the next group, or go on their own after `linger` seconds (a crash before then settles those
rows at their reservation: conservative, never under the bill). A process that dies leaves its rows
open or settled; the replica that restarts under the same name (at once), or any replica's sweeper
(once a row is older than the longest an attempt can be in flight), turns them into usage events in
the outbox, in the same transaction that closes them: settled rows with their real usage, open ones
at their reservation, flagged `at_reservation`. So the ledger never holds less than the provider
could have billed, and exactly what it billed for every attempt that settled.

Attempt numbers come from the journal (the next number for the tenant's request id), so a
request id retried on another replica that shares the database is a new, separately metered
event (`<request id>#<n>`), while a redelivery of one attempt's event is still deduplicated.
No grpc imports.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from services.inference.budget import Tokens
from services.inference.usage import UsageEvent
from shared.tenancy import TenantContext

log = logging.getLogger("bulkhead.inference.attempts")

OPEN, SETTLED, DELIVERED = 0, 1, 2
"""Row states: sent or about to be, usage known, event durable elsewhere (metering or the outbox)."""


def event_id(request_id: str, attempt: int) -> str:
    """The metering idempotency key of one attempt: the request id itself for the first."""
    return request_id if attempt <= 1 else f"{request_id}#{attempt}"


@dataclass(frozen=True, slots=True)
class NewAttempt:
    """An attempt to record before it goes upstream."""

    tenant_id: str
    request_id: str
    model: str
    reserve: Tokens
    """What the call holds of the budget: input estimate as input, max_tokens as output."""
    context: str
    """JSON of what the usage event needs besides usage (principal, agent, run, trace, tier, time)."""
    created_ms: int


@dataclass(frozen=True, slots=True)
class Attempt:
    """A recorded attempt."""

    row_id: int
    tenant_id: str
    request_id: str
    number: int
    """1 for the first attempt of the request id, counting up across retries and replicas."""
    reserve: Tokens

    @property
    def event_id(self) -> str:
        """Its metering idempotency key."""
        return event_id(self.request_id, self.number)


class AttemptStore(Protocol):
    """The journal's table (store.SqlAttempts)."""

    async def apply(
        self, opens: Sequence[NewAttempt], settles: Sequence[tuple], delivered: Sequence[int], replica: str
    ) -> list[tuple[int, int]]: ...

    async def recover(self, *, replica: str, before_ms: int) -> list[UsageEvent]: ...

    async def prune(self, before_ms: int) -> int: ...


class JournalUnavailable(Exception):
    """The attempt could not be recorded: it must not go upstream."""


class AttemptJournal:
    """Group-committed write-ahead records of upstream attempts for one replica."""

    def __init__(
        self,
        store: AttemptStore,
        *,
        replica: str,
        sweep_after: float = 660.0,
        retention: float = 3600.0,
        linger: float = 0.05,
        max_queued: int = 512,
    ):
        self._store = store
        self.replica = replica
        self._sweep_after = sweep_after
        self._retention = retention
        self._linger = linger
        self._max_queued = max_queued
        self._opens: list[tuple[NewAttempt, asyncio.Future]] = []
        self._settles: list[tuple] = []
        self._delivered: list[int] = []
        self._rows: dict[tuple[str, str], int] = {}
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._closing = False

    async def start(self) -> set[str]:
        """Settle what an earlier process of this replica left, then start writing; returns tenants with
        recovered usage."""
        tenants = await self._recover(self.replica, 0)
        self._task = asyncio.create_task(self._run(), name="attempt-journal")
        return tenants

    async def open(self, ctx: TenantContext, *, model: str, reserve: Tokens, context: str) -> Attempt:
        """Record an attempt durably (JournalUnavailable when the database cannot)."""
        new = NewAttempt(ctx.tenant_id, ctx.request_id, model, reserve, context, int(time.time() * 1000))
        future = asyncio.get_running_loop().create_future()
        self._opens.append((new, future))
        self._wake.set()
        row_id, number = await future
        return Attempt(row_id, ctx.tenant_id, ctx.request_id, number, reserve)

    def settle(self, attempt: Attempt, event: UsageEvent) -> None:
        """Record the attempt's usage (queued: a crash before it is written settles at the reservation)."""
        t = event.tokens
        self._settles.append(
            (
                attempt.row_id,
                t.input,
                t.output,
                t.cache_write,
                t.cache_read,
                event.outcome,
                event.latency_ms,
                1 if event.at_reservation else 0,
            )
        )
        self._rows[(event.tenant_id, event.idempotency_key)] = attempt.row_id
        if len(self._settles) >= self._max_queued:
            self._wake.set()

    def delivered(self, events: Sequence[UsageEvent]) -> None:
        """Metering or the outbox now holds these events: their rows are done."""
        for e in events:
            row_id = self._rows.pop((e.tenant_id, e.idempotency_key), None)
            if row_id is not None:
                self._delivered.append(row_id)
        if len(self._delivered) >= self._max_queued:
            self._wake.set()

    async def sweep(self) -> set[str]:
        """Settle rows no live attempt can still own (older than sweep_after), and prune old done rows."""
        now_ms = int(time.time() * 1000)
        tenants = await self._recover("", now_ms - int(self._sweep_after * 1000))
        await self._store.prune(now_ms - int(self._retention * 1000))
        return tenants

    async def close(self) -> None:
        """Write what is queued and stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self._write_once()

    async def _recover(self, replica: str, before_ms: int) -> set[str]:
        events = await self._store.recover(replica=replica, before_ms=before_ms)
        if events:
            reserved = sum(1 for e in events if e.at_reservation)
            log.warning(
                "settled %d attempts left unsettled (%d at their reservation) into the outbox", len(events), reserved
            )
        return {e.tenant_id for e in events}

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            if self._settles or self._delivered:
                # Lazy work waits for the next open (one transaction for both) or the linger: a timer
                # that sets the wake, not wait_for (a task and a timer per group).
                timer = loop.call_later(self._linger, self._wake.set)
                try:
                    await self._wake.wait()
                finally:
                    timer.cancel()
            else:
                await self._wake.wait()
            try:
                await self._write_once()
            except Exception:  # settles and deliveries were put back; opens were refused
                log.exception("attempt journal write failed; retrying")
                await asyncio.sleep(0.1)

    async def flush(self) -> None:
        """Write everything queued now (after any write in progress)."""
        await self._write_once()

    async def _write_once(self) -> None:
        async with self._lock:
            await self._write_locked()
            while self._opens:  # repeats of a request id deferred from the group just written
                await self._write_locked()

    async def _write_locked(self) -> None:
        # The wake says "work not taken yet": this group takes it all (opens that repeat a request id come
        # back in the next round of _write_once). Left set, an open that arrived during the previous write,
        # and was written by it, would wake the loop for a group of settles alone: a transaction more per
        # group at concurrency 32.
        self._wake.clear()
        opens, self._opens = _first_of_each(self._opens)
        settles, self._settles = self._settles, []
        delivered, self._delivered = self._delivered, []
        if not (opens or settles or delivered):
            return
        try:
            ids = await self._store.apply([o for o, _ in opens], settles, delivered, self.replica)
        except BaseException as exc:
            self._settles[:0] = settles
            self._delivered[:0] = delivered
            for _, future in opens:
                if not future.done():
                    future.set_exception(JournalUnavailable(f"attempt not recorded: {type(exc).__name__}"))
            raise
        for (_, future), result in zip(opens, ids, strict=True):
            if not future.done():
                future.set_result(result)


def _first_of_each(
    opens: list[tuple[NewAttempt, asyncio.Future]],
) -> tuple[list[tuple[NewAttempt, asyncio.Future]], list[tuple[NewAttempt, asyncio.Future]]]:
    """Split a group so it holds each request id once (its attempt number is taken in one statement);
    the repeats wait for the next group."""
    seen: set[tuple[str, str]] = set()
    first: list[tuple[NewAttempt, asyncio.Future]] = []
    later: list[tuple[NewAttempt, asyncio.Future]] = []
    for item in opens:
        key = (item[0].tenant_id, item[0].request_id)
        (later if key in seen else first).append(item)
        seen.add(key)
    return first, later


def context_json(ctx: TenantContext, *, trace_id: str, occurred_at: float) -> str:
    """What a recovered event needs besides usage, as the row's context column."""
    return orjson.dumps(
        {
            "p": ctx.principal_id,
            "a": ctx.agent_id or "",
            "r": ctx.run_id or "",
            "t": trace_id,
            "tier": ctx.tier or "pooled",
            "at": occurred_at,
        }
    ).decode()


def recovered_event(row: Sequence[Any]) -> UsageEvent:
    """The usage event of a row left behind: its settled usage, else its reservation (flagged)."""
    (
        tenant_id,
        request_id,
        attempt,
        model,
        reserve_input,
        reserve_output,
        state,
        at_reservation,
        input_tokens,
        output_tokens,
        cache_write,
        cache_read,
        outcome,
        latency_ms,
        context,
    ) = row
    c = json.loads(context)
    # RETURNING shows the row as closed (state 2); a settled row is the one whose outcome was written.
    if state == SETTLED or outcome:
        tokens = Tokens(int(input_tokens), int(output_tokens), int(cache_write), int(cache_read))
        flagged = bool(at_reservation)
    else:
        tokens, flagged, outcome = Tokens(int(reserve_input), int(reserve_output)), True, "error"
    return UsageEvent(
        tenant_id=tenant_id,
        idempotency_key=event_id(request_id, attempt),
        principal_id=c["p"],
        agent_id=c["a"],
        run_id=c["r"],
        model=model,
        tokens=tokens,
        latency_ms=int(latency_ms),
        outcome=outcome or "error",
        occurred_at=c["at"],
        trace_id=c["t"],
        tier=c["tier"],
        attempt=int(attempt),
        at_reservation=flagged,
    )

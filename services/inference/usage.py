"""Usage metering: every call's real usage reaches metering exactly once, in order per tenant.

Events are batched in memory and sent with RecordUsage (idempotent by request id). When
metering cannot be reached, the batch goes to a durable outbox; while a tenant has events in
the outbox, its new events queue behind them, so delivery stays in order. The outbox drains
with the proxy's own platform credentials (RecordTenantUsage) when it has a service key, so a
backlog is delivered even if its tenant never calls again; without one, it drains with the
tenant's credentials once this replica has a live context for it. No grpc imports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from services.inference.budget import Tokens
from shared.tenancy import TenantContext, tenant_scope

log = logging.getLogger("bulkhead.inference.usage")


@dataclass(frozen=True)
class UsageEvent:
    """One metered model call."""

    tenant_id: str
    idempotency_key: str
    """The call's request id."""
    principal_id: str
    agent_id: str
    run_id: str
    model: str
    """The pinned version that served the call."""
    tokens: Tokens
    latency_ms: int
    outcome: str
    """success, error, rejected or cancelled."""
    occurred_at: float
    """Unix seconds when the call was made."""
    trace_id: str = ""
    tier: str = "pooled"
    """The tenant's tier, from its signed token at call time (metering files the rows by it)."""
    attempt: int = 1
    """Which upstream attempt of the request id this is (idempotency_key names it too)."""
    at_reservation: bool = False
    """Charged at the attempt's reservation: its real usage was never known (a crash, a lost reply)."""


class UsageRejected(Exception):
    """Metering refused a batch as invalid: sending it again can never succeed."""


class UsageBackend(Protocol):
    """Metering's RecordUsage, called with the tenant's context bound."""

    async def record(self, events: Sequence[UsageEvent]) -> None: ...


class PlatformDelivery(Protocol):
    """Metering's RecordTenantUsage with this service's own platform credentials: delivery that
    needs no tenant token, so a backlog drains even when its tenant never calls again."""

    async def record_for(self, tenant_id: str, events: Sequence[UsageEvent]) -> None: ...


class Outbox(Protocol):
    """Durable storage for usage not yet acknowledged by metering, in insertion order."""

    async def append(self, events: Sequence[UsageEvent]) -> None: ...

    async def pending(self, tenant_id: str, limit: int) -> list[tuple[int, UsageEvent]]: ...

    async def delete(self, ids: Sequence[int]) -> None: ...

    async def tenants(self) -> set[str]: ...


class UsageMeter:
    """Batches usage per tenant and delivers it; falls back to the outbox when metering is down."""

    def __init__(
        self,
        backend: UsageBackend,
        outbox: Outbox,
        *,
        batch_size: int = 200,
        flush_interval: float = 0.05,
        retry_interval: float = 1.0,
        platform: PlatformDelivery | None = None,
        on_durable: Callable[[Sequence[UsageEvent]], None] | None = None,
    ):
        self._backend = backend
        self._platform = platform
        self._outbox = outbox
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._retry_interval = retry_interval
        self._queues: dict[str, list[UsageEvent]] = {}
        self._contexts: dict[str, TenantContext] = {}
        self._backlogged: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._closing = False
        self._on_durable = on_durable or (lambda events: None)

    def adopt_backlog(self, tenant_ids: set[str]) -> None:
        """Tenants whose events something else put in the outbox (recovered attempts): deliver them too."""
        if tenant_ids:
            self._backlogged |= tenant_ids
            self._wake.set()

    async def start(self) -> None:
        """Find tenants with undelivered events from a previous run, then start delivering."""
        self._backlogged |= await self._outbox.tenants()
        self._task = asyncio.create_task(self._run(), name="usage-meter")

    def record(self, ctx: TenantContext, event: UsageEvent) -> None:
        """Queue one event for delivery (never blocks the call path)."""
        self._contexts[ctx.tenant_id] = ctx
        queue = self._queues.setdefault(ctx.tenant_id, [])
        queue.append(event)
        if len(queue) >= self._batch_size or ctx.tenant_id in self._backlogged:
            self._wake.set()

    @property
    def backlogged_tenants(self) -> frozenset[str]:
        """Tenants whose usage waits in the outbox."""
        return frozenset(self._backlogged)

    async def flush(self) -> None:
        """Deliver (or persist) everything queued now, and try each outbox backlog once."""
        async with self._lock:
            for tenant_id in list(set(self._queues) | self._backlogged):
                await self._flush_tenant(tenant_id)

    async def close(self) -> None:
        """Stop the delivery loop and flush what is queued (to metering or the outbox)."""
        if self._task is not None:
            # Let the loop finish its round: cancelling it mid-write would leave a transaction open.
            self._closing = True
            self._wake.set()
            await self._task
            self._task = None
        await self.flush()

    async def _run(self) -> None:
        last_retry = 0.0
        loop = asyncio.get_running_loop()
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._flush_interval)
            self._wake.clear()
            if self._closing:
                return
            retry = loop.time() - last_retry >= self._retry_interval
            if retry:
                last_retry = loop.time()
            try:
                async with self._lock:
                    for tenant_id in list(self._queues):
                        if self._queues.get(tenant_id):
                            await self._flush_tenant(tenant_id)
                    if retry:
                        for tenant_id in list(self._backlogged - set(self._queues)):
                            await self._flush_tenant(tenant_id)
            except Exception:
                log.exception("usage delivery failed; will retry")
                await asyncio.sleep(self._retry_interval / 4)

    async def _flush_tenant(self, tenant_id: str) -> None:
        batch = self._queues.pop(tenant_id, [])
        kept = False  # metering or the outbox holds the batch
        try:
            ctx = self._contexts.get(tenant_id)
            if tenant_id in self._backlogged or ctx is None:
                if batch:
                    await self._outbox.append(batch)
                    kept = True
                    self._backlogged.add(tenant_id)
                    self._on_durable(batch)
                if ctx is not None or self._platform is not None:
                    await self._drain(tenant_id, ctx)
                return
            try:
                with tenant_scope(ctx):
                    await self._backend.record(batch)
            except UsageRejected as exc:
                # Kept, it would block every later event of the tenant; logged loudly for an operator.
                log.error("metering rejected %d usage events of %s: %s", len(batch), tenant_id, exc)
            except Exception as exc:  # noqa: BLE001 - unreachable, or refused (an expired token): keep, never drop
                log.warning(
                    "usage not delivered (%s): %d events of %s kept in the outbox",
                    type(exc).__name__,
                    len(batch),
                    tenant_id,
                )
                await self._outbox.append(batch)
                self._backlogged.add(tenant_id)
            kept = True
            self._on_durable(batch)
        except BaseException:
            # Neither metering nor the outbox took it (the database is down as well): back in the
            # queue, ahead of what came meanwhile, and retried; never dropped.
            if batch and not kept:
                self._queues[tenant_id] = batch + self._queues.get(tenant_id, [])
            raise

    async def _drain(self, tenant_id: str, ctx: TenantContext | None) -> None:
        """Send the tenant's outbox oldest first; stop at the first failure (order is kept)."""
        while True:
            rows = await self._outbox.pending(tenant_id, self._batch_size)
            if not rows:
                self._backlogged.discard(tenant_id)
                return
            try:
                await self._send_backlog(tenant_id, ctx, [event for _, event in rows])
            except UsageRejected as exc:
                log.error("metering rejected %d outbox events of %s: %s", len(rows), tenant_id, exc)
            except Exception as exc:  # noqa: BLE001 - whatever failed, the rows stay for the next try
                log.warning("outbox of %s not drained yet (%s)", tenant_id, type(exc).__name__)
                return
            # A crash between record and delete re-sends the batch; metering drops the duplicates.
            await self._outbox.delete([row_id for row_id, _ in rows])

    async def _send_backlog(self, tenant_id: str, ctx: TenantContext | None, events: list[UsageEvent]) -> None:
        # The platform path first when there is one: a tenant's token may have expired long ago.
        if self._platform is not None:
            await self._platform.record_for(tenant_id, events)
            return
        if ctx is None:  # _drain counts this like any failed send: the rows stay for the next try
            raise RuntimeError(f"no platform path and no caller context to send {tenant_id}'s backlog with")
        with tenant_scope(ctx):
            await self._backend.record(events)

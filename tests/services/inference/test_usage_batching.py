"""UsageMeter on its own: batching by interval and size, order, shutdown flush, outbox on an outage."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from services.inference.budget import Tokens
from services.inference.config import InferenceConfig
from services.inference.usage import UsageEvent, UsageMeter
from shared.tenancy import TenantContext

TENANT = "t_batch"
CTX = TenantContext(tenant_id=TENANT, principal_id="p_1", scopes=frozenset({"*"}))


def _event(n: int) -> UsageEvent:
    return UsageEvent(
        tenant_id=TENANT,
        idempotency_key=f"r{n}",
        principal_id="p_1",
        agent_id="",
        run_id="",
        model="m",
        tokens=Tokens(input=n, output=1),
        latency_ms=1,
        outcome="success",
        occurred_at=0.0,
    )


class Metering:
    """Records the batches it is sent; `down` makes it unreachable."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.down = False

    async def record(self, events: Sequence[UsageEvent]) -> None:
        if self.down:
            raise ConnectionError("metering down")
        self.batches.append([e.idempotency_key for e in events])


class MemoryOutbox:
    """An in-memory Outbox with the SQL one's ordering."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, UsageEvent]] = []
        self._next = 0

    async def append(self, events: Sequence[UsageEvent]) -> None:
        for e in events:
            self._next += 1
            self.rows.append((self._next, e))

    async def pending(self, tenant_id: str, limit: int) -> list[tuple[int, UsageEvent]]:
        return [r for r in self.rows if r[1].tenant_id == tenant_id][:limit]

    async def delete(self, ids: Sequence[int]) -> None:
        self.rows = [r for r in self.rows if r[0] not in set(ids)]

    async def tenants(self) -> set[str]:
        return {e.tenant_id for _, e in self.rows}


async def test_events_within_one_interval_go_as_one_ordered_batch():
    """Nothing is sent before the interval ends; then one RecordUsage carries every event, oldest first."""
    metering = Metering()
    meter = UsageMeter(metering, MemoryOutbox(), flush_interval=0.3)
    await meter.start()
    for n in range(5):
        meter.record(CTX, _event(n))
    await asyncio.sleep(0.1)
    assert metering.batches == []
    await asyncio.sleep(0.5)
    assert metering.batches == [["r0", "r1", "r2", "r3", "r4"]]
    await meter.close()


async def test_a_full_batch_goes_without_waiting_for_the_interval():
    """batch_size events wake the delivery loop at once."""
    metering = Metering()
    meter = UsageMeter(metering, MemoryOutbox(), batch_size=3, flush_interval=30.0)
    await meter.start()
    for n in range(3):
        meter.record(CTX, _event(n))
    for _ in range(100):
        if metering.batches:
            break
        await asyncio.sleep(0.01)
    assert metering.batches == [["r0", "r1", "r2"]]
    await meter.close()


async def test_close_delivers_what_is_still_queued():
    """Graceful shutdown sends the events that were waiting for the interval."""
    metering = Metering()
    meter = UsageMeter(metering, MemoryOutbox(), flush_interval=30.0)
    await meter.start()
    meter.record(CTX, _event(1))
    meter.record(CTX, _event(2))
    await meter.close()
    assert metering.batches == [["r1", "r2"]]


async def test_an_outage_keeps_batches_in_the_outbox_and_later_events_queue_behind_them():
    """Unreachable metering: events go to the outbox; once it is back, all arrive once, in record order."""
    metering, outbox = Metering(), MemoryOutbox()
    meter = UsageMeter(metering, outbox, flush_interval=30.0)
    await meter.start()
    metering.down = True
    meter.record(CTX, _event(1))
    meter.record(CTX, _event(2))
    await meter.flush()
    assert [e.idempotency_key for _, e in outbox.rows] == ["r1", "r2"]
    assert meter.backlogged_tenants == {TENANT}
    meter.record(CTX, _event(3))  # behind the backlog, even before metering is back
    metering.down = False
    await meter.close()
    assert [key for batch in metering.batches for key in batch] == ["r1", "r2", "r3"]
    assert outbox.rows == [] and meter.backlogged_tenants == frozenset()


class DownOutbox(MemoryOutbox):
    """An outbox whose database can be down."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def append(self, events: Sequence[UsageEvent]) -> None:
        if self.down:
            raise ConnectionError("database down")
        await super().append(events)


async def test_a_batch_neither_metering_nor_the_outbox_takes_is_kept_and_retried():
    """Metering and the outbox's database both down: the batch stays queued (ahead of later events)
    and arrives once, in order, when they are back; nothing is reported durable before that."""
    metering, outbox = Metering(), DownOutbox()
    durable: list[str] = []
    meter = UsageMeter(
        metering,
        outbox,
        flush_interval=30.0,
        on_durable=lambda events: durable.extend(e.idempotency_key for e in events),
    )
    await meter.start()
    metering.down = outbox.down = True
    meter.record(CTX, _event(1))
    meter.record(CTX, _event(2))
    with pytest.raises(ConnectionError):
        await meter.flush()
    meter.record(CTX, _event(3))
    assert durable == [] and outbox.rows == []
    metering.down = outbox.down = False
    await meter.close()
    assert [key for batch in metering.batches for key in batch] == ["r1", "r2", "r3"]
    assert durable == ["r1", "r2", "r3"]


def test_flush_interval_comes_from_the_environment():
    """BULKHEAD_INFERENCE_USAGE_FLUSH_SECONDS sets the interval; 0.2 s by default."""
    assert InferenceConfig.from_env({}).usage_flush_seconds == 0.2
    assert InferenceConfig.from_env({"BULKHEAD_INFERENCE_USAGE_FLUSH_SECONDS": "0.05"}).usage_flush_seconds == 0.05

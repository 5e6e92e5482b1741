"""The outbox drains with the proxy's own platform credentials: usage held through a metering outage
reaches the tenant's ledger even when that tenant never calls again (its token long expired)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence

import pytest

from bulkhead.inference.v1 import inference_pb2 as pb
from services.inference.peers import MeteringClient, PlatformUsage
from services.inference.store import SqlOutbox
from services.inference.usage import UsageEvent, UsageMeter, UsageRejected
from services.metering.server import MIGRATIONS as METERING_MIGRATIONS
from services.metering.server import serve_metering
from shared.client import StaticCredentials, make_channel
from shared.db import Database

from .helpers import PINNED, fake_totals, params
from .test_usage_batching import TENANT, MemoryOutbox, Metering, _event


class Platform:
    """Records what RecordTenantUsage was sent; `down` makes it unreachable."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, list[str], set[str]]] = []
        self.down = False

    async def record_for(self, tenant_id: str, events: Sequence[UsageEvent]) -> None:
        if self.down:
            raise ConnectionError("metering down")
        self.batches.append((tenant_id, [e.idempotency_key for e in events], {e.tier for e in events}))


async def _until_empty(outbox: MemoryOutbox, seconds: float = 3.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if not outbox.rows:
            return
        await asyncio.sleep(0.05)


async def _backlog() -> MemoryOutbox:
    """An outbox an earlier run left behind: two events of a bridge-tier tenant."""
    outbox = MemoryOutbox()
    await outbox.append([dataclasses.replace(_event(n), tier="bridge") for n in (1, 2)])
    return outbox


async def test_a_backlog_drains_through_the_platform_path_with_no_tenant_call():
    outbox, metering, platform = await _backlog(), Metering(), Platform()
    meter = UsageMeter(metering, outbox, flush_interval=0.05, retry_interval=0.05, platform=platform)
    await meter.start()
    await _until_empty(outbox)
    await meter.close()
    assert platform.batches == [(TENANT, ["r1", "r2"], {"bridge"})]  # oldest first, filed by the tenant's tier
    assert metering.batches == [] and outbox.rows == []


async def test_without_a_service_key_the_backlog_waits_for_its_tenant():
    outbox, metering = await _backlog(), Metering()
    meter = UsageMeter(metering, outbox, flush_interval=0.05, retry_interval=0.05)
    await meter.start()
    await _until_empty(outbox, seconds=0.5)
    await meter.close()
    assert [e.idempotency_key for _, e in outbox.rows] == ["r1", "r2"] and metering.batches == []


async def test_a_failed_platform_delivery_keeps_the_rows_for_the_next_try():
    outbox, platform = await _backlog(), Platform()
    platform.down = True
    meter = UsageMeter(Metering(), outbox, flush_interval=0.05, retry_interval=0.05, platform=platform)
    await meter.start()
    await asyncio.sleep(0.3)
    assert len(outbox.rows) == 2
    platform.down = False
    await _until_empty(outbox)
    await meter.close()
    assert platform.batches == [(TENANT, ["r1", "r2"], {"bridge"})]


async def test_outage_usage_reaches_metering_with_the_proxys_own_token(mesh):
    """Metering down for three calls, the proxy restarted: the outbox drains through RecordTenantUsage
    with a platform token, and metering's totals equal the upstream's, call for call."""
    await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=mesh.md("t_a"))
    await mesh.settle()
    await mesh.metering.stop(grace=0)
    for i in range(3):
        await mesh.stub.CreateMessage(
            pb.CreateMessageRequest(params=params(f"during outage {i}")),
            metadata=(*mesh.md("t_a"), ("x-request-id", f"req-platform-{i}")),
        )
    opaque_user = mesh.proxy.proxy.opaque_user_id("t_a")
    await mesh.stop_proxy(mesh.proxies[0])
    mdb = await Database.open(f"sqlite+aiosqlite:///{mesh.tmp / 'metering.db'}", migrations=str(METERING_MIGRATIONS))
    mesh.metering = await serve_metering(
        db=mdb, verifier=mesh.tokens.verifier, price_cache_s=0, address=mesh.metering.running.address
    )

    token = mesh.tokens.mint("t_platform", ("platform.metering.record",), principal_id="p_svc_inference")
    platform_channel = make_channel(mesh.metering.running.address, credentials=StaticCredentials(token, "t_platform"))
    tenant_channel = make_channel(mesh.metering.running.address, forward=True)  # unused: no tenant calls again
    outbox_db = await Database.open(f"sqlite+aiosqlite:///{mesh.tmp / 'inference.db'}")
    outbox = SqlOutbox(outbox_db)
    try:
        meter = UsageMeter(
            MeteringClient(tenant_channel), outbox, retry_interval=0.05, platform=PlatformUsage(platform_channel)
        )
        await meter.start()
        for _ in range(60):
            if await outbox.count() == 0:
                break
            await asyncio.sleep(0.05)
        await meter.close()
        assert await outbox.count() == 0
    finally:
        await outbox_db.close()
        await platform_channel.close()
        await tenant_channel.close()
    calls, fake_in, fake_out = fake_totals(mesh.fake, opaque_user)
    rows = await mesh.metered("t_a")
    assert calls == 4 and [(m, n, i, o) for m, n, i, o, _ in rows] == [(PINNED, calls, fake_in, fake_out)]


async def test_events_of_an_unknown_tier_are_rejected_not_retried_forever():
    """A tier metering could never file is UsageRejected before any send (the channel leads nowhere)."""
    channel = make_channel("127.0.0.1:1")
    try:
        with pytest.raises(UsageRejected, match="unknown tenant tier"):
            await PlatformUsage(channel, timeout=0.5).record_for(
                TENANT, [dataclasses.replace(_event(1), tier="shared")]
            )
    finally:
        await channel.close()

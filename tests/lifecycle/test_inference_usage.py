"""The proxy's purge keeps the ledger whole: outboxed usage reaches metering before its rows go."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from bulkhead.common.v1 import lifecycle_pb2 as lpb
from bulkhead.common.v1 import lifecycle_pb2_grpc, tenancy_pb2
from services.identity.peers import PlatformCaller
from services.inference.budget import Tokens
from services.inference.usage import UsageEvent
from shared.errors import error_details
from shared.tenancy import TenantContext
from testkit.fake_anthropic import FakeAnthropic
from tests.services.orchestrator.mesh import running_mesh


def event(tenant_id: str, key: str) -> UsageEvent:
    return UsageEvent(
        tenant_id=tenant_id,
        idempotency_key=key,
        principal_id="p_x",
        agent_id="",
        run_id="",
        model="claude-test",
        tokens=Tokens(input=3, output=2),
        latency_ms=5,
        outcome="success",
        occurred_at=time.time(),
    )


async def test_undelivered_usage_blocks_the_purge_until_metering_has_it(tmp_path):
    """UNAVAILABLE/USAGE_UNDELIVERED while the outbox cannot drain; once it can, both events are in metering."""
    async with FakeAnthropic() as upstream, running_mesh(tmp_path, upstream_url=upstream.base_url) as mesh:
        t = await mesh.tenant()
        inference = mesh.services["inference"]
        await inference.outbox.append([event(t.tenant_id, "req-outboxed")])  # a killed replica's leftover
        platform = await PlatformCaller(mesh.identity.app.keys).metadata()
        req = lpb.PurgeTenantRequest(tenant_id=t.tenant_id, tier=tenancy_pb2.TIER_POOLED)
        async with (
            grpc.aio.insecure_channel(inference.running.address) as ich,
            grpc.aio.insecure_channel(mesh.addr("metering")) as mch,
        ):
            purge = lifecycle_pb2_grpc.TenantLifecycleServiceStub(ich).PurgeTenant
            with pytest.raises(grpc.aio.AioRpcError) as err:  # no platform key here, no tenant token known
                await purge(req, metadata=platform)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_details(err.value)["reason"] == "USAGE_UNDELIVERED"
            assert len(await inference.outbox.pending(t.tenant_id, 10)) == 1

            # The tenant calls once more: its token lets the meter drain the outbox.
            ctx = TenantContext(t.tenant_id, "p_x", frozenset({"*"}), token=t.token)
            inference.meter.record(ctx, event(t.tenant_id, "req-live"))
            for _ in range(50):
                try:
                    out = await purge(req, metadata=platform)
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("the purge never went through")
            assert {a.name for a in out.actions} == {"usage_delivered"}
            assert await inference.outbox.pending(t.tenant_id, 10) == []
            kept = await lifecycle_pb2_grpc.TenantLifecycleServiceStub(mch).InventoryTenant(
                lpb.InventoryTenantRequest(tenant_id=t.tenant_id, tier=tenancy_pb2.TIER_POOLED), metadata=platform
            )
            assert {x.table: x.rows for x in kept.tables}["metering_usage_events"] == 2

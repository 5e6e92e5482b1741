"""Suspending a tenant pauses its runs at the next step boundary; resuming finishes them, each model
call made (and metered) once. Runs for a tenant of each isolation tier."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from bulkhead.identity.v1 import identity_pb2 as ipb
from bulkhead.metering.v1 import metering_pb2, metering_pb2_grpc
from bulkhead.orchestrator.v1 import orchestrator_pb2 as pb

from .fakes import ToolServer
from .mesh import TIERS, team_pb
from .test_e2e import MODEL, SECRET, put_secret, script_support, watch

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.parametrize("tier", list(TIERS))]


@pytest.fixture
def tools():
    server = ToolServer(body='{"invoice": "INV-7", "status": "paid"}')
    yield server
    server.close()


async def _set_status(mesh, tenant, status) -> None:
    await mesh.identity.stub.UpdateTenantStatus(
        ipb.UpdateTenantStatusRequest(tenant_id=tenant.tenant_id, status=status),
        metadata=mesh.identity.operator.metadata,
    )


async def _first_model_call(mesh, tenant, run_id: str) -> None:
    async for message in mesh.stub.WatchRun(pb.WatchRunRequest(run_id=run_id), metadata=tenant.metadata, timeout=30):
        if message.step.kind == pb.STEP_KIND_MODEL_CALL:
            return


def _queue_state(mesh, run_id: str):
    """The run's queue entry (state, lease owner), read as the dispatcher reads it."""
    from sqlalchemy import select

    from services.orchestrator.store import QueueRow

    async def read():
        async with mesh.orchestrator.db.system_session() as s:
            return (
                await s.execute(select(QueueRow.state, QueueRow.lease_owner).where(QueueRow.run_id == run_id))
            ).first()

    return read()


async def test_suspended_tenants_run_pauses_and_finishes_after_resume(tier, mesh, upstream, tools):
    """After suspension the upstream sees no new request of the run and the run stays unfinished and
    unclaimed; after resume it succeeds, and metering holds one event per model call."""
    a = await mesh.tenant(tier)
    await put_secret(mesh, a, "billing_api_key", SECRET)  # the tool step fetches it (credentials refuses it too)
    await mesh.stub.CreateTeam(
        pb.CreateTeamRequest(team=team_pb(tool_host=tools.host, model=MODEL)), metadata=a.metadata
    )
    script_support(upstream)
    # Each model call takes 0.6 s: the run's last two (1.2 s) outlast the verifiers' poll (0.5 s here) even on a
    # loaded machine, so the suspension reaches it mid-run, at one step boundary or another.
    upstream.delay = 0.6
    try:
        run = (
            await mesh.stub.StartRun(pb.StartRunRequest(team="support", input="Is INV-7 paid?"), metadata=a.metadata)
        ).run
        await _first_model_call(mesh, a, run.run_id)
        await _set_status(mesh, a, ipb.TENANT_STATUS_SUSPENDED)

        # Within the 2 s the verifiers need, the run stops at a step boundary and goes back to the queue.
        deadline = time.monotonic() + 4
        while (await _queue_state(mesh, run.run_id)) != ("queued", None):
            assert time.monotonic() < deadline, "the suspended tenant's run was not paused"
            await asyncio.sleep(0.1)
        calls_paused = upstream.request_count
        await asyncio.sleep(1.5)  # several dispatch rounds: it is not claimed again while suspended
        assert upstream.request_count == calls_paused
        assert await _queue_state(mesh, run.run_id) == ("queued", None)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await mesh.stub.GetRun(pb.GetRunRequest(run_id=run.run_id), metadata=a.metadata)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

        await _set_status(mesh, a, ipb.TENANT_STATUS_ACTIVE)
        await asyncio.sleep(1.2)  # the verifiers learn the resume within one poll (0.5 s here)...
        await _accepted_again(mesh, a, run.run_id)  # ...or a little later on a loaded machine
        seen = await watch(mesh, a, run.run_id)
    finally:
        upstream.delay = 0.0
    assert seen[-1].run.status == pb.RUN_STATUS_SUCCEEDED
    model_steps = [m for m in seen if m.step.kind == pb.STEP_KIND_MODEL_CALL]
    steps = [(m.step.index, pb.StepKind.Name(m.step.kind), m.step.summary) for m in seen]
    assert len(model_steps) == 3 == upstream.request_count, (steps, upstream.request_count)  # none repeated
    assert [s for s in steps if s[1] == "STEP_KIND_TOOL_CALL"] == [
        (5, "STEP_KIND_TOOL_CALL", "lookup_invoice: ok (HTTP 200)")
    ]

    metering = metering_pb2_grpc.MeteringServiceStub(grpc.aio.insecure_channel(mesh.addr("metering")))
    window = metering_pb2.UsageFilter()
    window.start_time.FromSeconds(int(time.time()) - 3600)
    window.end_time.FromSeconds(int(time.time()) + 3600)
    deadline = time.monotonic() + 5
    while True:  # usage reaches metering in batches
        rows = (await metering.QueryUsage(metering_pb2.QueryUsageRequest(filter=window), metadata=a.metadata)).rows
        if sum(r.event_count for r in rows) >= 3 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert sum(r.event_count for r in rows) == 3


async def _accepted_again(mesh, tenant, run_id: str, timeout: float = 5.0) -> None:
    """Wait until the orchestrator's verifier has learnt of the resume (GetRun is no longer refused)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await mesh.stub.GetRun(pb.GetRunRequest(run_id=run_id), metadata=tenant.metadata)
            return
        except grpc.aio.AioRpcError as refused:
            assert refused.code() == grpc.StatusCode.PERMISSION_DENIED, refused.details()
            assert time.monotonic() < deadline, "the resume did not reach the orchestrator's verifier"
            await asyncio.sleep(0.1)

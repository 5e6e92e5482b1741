"""A suspended tenant: the proxy refuses its calls and hands its budget leases back to metering with
the proxy's own platform key (the tenant's token is refused everywhere); after resume its calls are
metered once each, and the budget's used equals what the upstream billed."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from bulkhead.inference.v1 import inference_pb2 as pb
from services.inference.peers import PlatformUsage
from shared.client import StaticCredentials, make_channel
from shared.errors import error_details

from .helpers import OPERATOR, fake_totals, params, start_mesh, stop_mesh

TENANT = "t_suspended"


@pytest.fixture
async def mesh(tmp_path, db_templates):
    """One proxy replica whose platform key is a platform token the mesh's verifier accepts."""
    m = await start_mesh(tmp_path, templates=db_templates, proxies=0)
    token = m.tokens.mint(OPERATOR, ("platform.metering.record",), principal_id="p_inference")
    channel = make_channel(m.metering.running.address, credentials=StaticCredentials(token, OPERATOR))
    m.channels.append(channel)
    await m.start_proxy(platform=PlatformUsage(channel))
    try:
        yield m
    finally:
        await stop_mesh(m)


async def _call(mesh):
    return await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=mesh.md(TENANT))


async def _within(seconds: float, check, what: str) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, f"{what} after {seconds} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_suspension_refuses_calls_and_returns_leases_then_resume_meters_each_call_once(mesh):
    """Suspended: the call is PERMISSION_DENIED (TENANT_SUSPENDED), the replica holds no lease of the
    tenant within 2 s, and metering holds nothing for it; resumed: calls work, each metered once."""
    await mesh.set_budget(TENANT, 50_000)
    await _call(mesh)
    budget = mesh.proxy.budget
    assert budget.held_tokens(TENANT) > 0  # a lease is held on this replica

    mesh.tokens.keys.suspended.add(TENANT)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _call(mesh)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_details(refused.value)["reason"] == "TENANT_SUSPENDED"
    await _within(2.0, lambda: budget.held_tokens(TENANT) == 0, "suspended tenant's lease still held")

    mesh.tokens.keys.suspended.discard(TENANT)
    status = await mesh.budget_status(TENANT)
    assert status.held == 0, "the lease went back to metering, not only out of this replica"
    calls, billed_in, billed_out = fake_totals(mesh.fake, mesh.proxy.proxy.opaque_user_id(TENANT))
    assert status.used == billed_in + billed_out  # the handed-back lease charged its spend exactly

    await _call(mesh)
    await mesh.settle()
    calls, billed_in, billed_out = fake_totals(mesh.fake, mesh.proxy.proxy.opaque_user_id(TENANT))
    [(_model, events, metered_in, metered_out, _)] = await mesh.metered(TENANT)
    assert (events, metered_in, metered_out) == (calls, billed_in, billed_out) == (2, billed_in, billed_out)


async def test_without_a_platform_key_a_suspended_tenants_lease_waits_for_expiry(tmp_path, db_templates):
    """No platform key: the replica keeps the lease (metering expires it) instead of retrying the refused token."""
    m = await start_mesh(tmp_path, templates=db_templates)
    try:
        await m.set_budget(TENANT, 50_000)
        await _call(m)
        m.tokens.keys.suspended.add(TENANT)
        await m.proxy.budget.maintain()
        assert m.proxy.budget.held_tokens(TENANT) > 0
    finally:
        await stop_mesh(m)

"""Budgets and rate limits refuse a call before any upstream request, and budgets hold across replicas."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from bulkhead.inference.v1 import inference_pb2 as pb
from services.inference import wire
from shared.errors import error_details
from testkit.fake_anthropic import Fault, Reply

from .helpers import PINNED, fake_totals, params


def _reservation(p: pb.MessageParams) -> int:
    body = wire.params_to_json(p, model=PINNED, max_tokens=p.max_tokens)
    return wire.estimate_input_tokens(body) + p.max_tokens


async def _expect(call, code, reason):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    details = error_details(info.value)
    assert details["reason"] == reason
    return details


async def test_over_budget_tenant_is_refused_before_any_upstream_request(mesh):
    """A budget smaller than the call's worst case: RESOURCE_EXHAUSTED with QuotaFailure, and the fake saw nothing."""
    await mesh.set_budget("t_a", _reservation(params()) - 1)
    details = await _expect(
        mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=mesh.md("t_a")),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "BUDGET_EXHAUSTED",
    )
    assert details["quota"]
    await _expect(
        _first(mesh.stub.StreamMessage(pb.StreamMessageRequest(params=params()), metadata=mesh.md("t_a"))),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "BUDGET_EXHAUSTED",
    )
    assert mesh.fake.request_count == 0


async def test_one_tenant_cannot_spend_anothers_budget(mesh):
    """Tenant A at its budget is refused while tenant B, with budget left, is served; each is charged its own."""
    await mesh.set_budget("t_a", _reservation(params()) - 1)
    await mesh.set_budget("t_b", 100_000)
    await _expect(
        mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=mesh.md("t_a")),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "BUDGET_EXHAUSTED",
    )
    resp = await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=mesh.md("t_b"))
    await mesh.settle()
    assert await mesh.metered("t_a") == []
    assert (await mesh.metered("t_b"))[0][:2] == (PINNED, 1)
    assert resp.usage.output_tokens > 0 and (await mesh.budget_status("t_a")).used == 0


@pytest.mark.slow
async def test_200_concurrent_calls_never_overspend_across_two_replicas(mesh):
    """200 calls at once over 2 replicas, each using exactly its reservation: the budget is never exceeded."""
    await mesh.start_proxy()
    p = params()
    cost = _reservation(p)
    budget = cost * 30 + cost // 2
    await mesh.set_budget("t_a", budget)
    input_tokens = cost - p.max_tokens
    mesh.fake.script(*[Reply.text("x", usage={"input_tokens": input_tokens, "output_tokens": p.max_tokens})] * 200)
    mesh.fake.delay = 0.01

    async def one(i: int) -> str:
        stub = mesh.proxies[i % 2].stub
        try:
            await stub.CreateMessage(pb.CreateMessageRequest(params=p), metadata=mesh.md("t_a"))
            return "ok"
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
            return "refused"

    outcomes = await asyncio.gather(*(one(i) for i in range(200)))
    await mesh.settle()
    served = outcomes.count("ok")
    calls, fake_in, fake_out = fake_totals(mesh.fake, mesh.proxy.proxy.opaque_user_id("t_a"))
    assert 1 <= served <= 30 and calls == served == mesh.fake.request_count
    assert fake_in + fake_out == served * cost <= budget
    status = await mesh.budget_status("t_a")
    assert status.used + status.held <= budget
    assert sum(row[2] + row[3] for row in await mesh.metered("t_a")) == fake_in + fake_out


async def test_requests_per_minute_limit(mesh):
    """Over requests/min: RESOURCE_EXHAUSTED with the violated limit and a retry delay; the upstream saw
    only the allowed."""
    await mesh.set_limits("t_a", requests_per_minute=2)
    for _ in range(2):
        await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=mesh.md("t_a"))
    details = await _expect(
        mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=mesh.md("t_a")),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
    )
    assert details["quota"][0][0] == "requests_per_minute" and 0 < details["retry_after"] <= 60
    assert mesh.fake.request_count == 2
    await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=mesh.md("t_b"))


async def test_tokens_per_minute_limit(mesh):
    """A call whose worst case exceeds the tokens/min left is refused before the upstream."""
    await mesh.set_limits("t_a", tokens_per_minute=_reservation(params()) + 10)
    await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=mesh.md("t_a"))
    details = await _expect(
        mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params(max_tokens=200)), metadata=mesh.md("t_a")),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
    )
    assert details["quota"][0][0] == "tokens_per_minute"
    assert mesh.fake.request_count == 1


async def test_concurrent_calls_limit(mesh):
    """With one call in flight and a limit of one, a second call is refused; after it finishes, calls pass again."""
    await mesh.set_limits("t_a", concurrent_calls=1)
    mesh.fake.fail_next(Fault.slow(0.5))
    first = asyncio.ensure_future(
        mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=mesh.md("t_a"))
    )
    while mesh.fake.request_count == 0:
        await asyncio.sleep(0.01)
    details = await _expect(
        mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=mesh.md("t_a")),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
    )
    assert details["quota"][0][0] == "concurrent_calls"
    await first
    await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=mesh.md("t_a"))
    assert mesh.fake.request_count == 2


async def _first(stream):
    async for event in stream:
        return event


async def test_leases_charge_exactly_the_real_usage(mesh):
    """When a replica returns its leases, the budget is charged what the upstream reported, and nothing stays held."""
    await mesh.set_budget("t_a", 100_000)
    for text in ("one", "two words", "three small words"):
        await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params(text)), metadata=mesh.md("t_a"))
    held = await mesh.budget_status("t_a")
    assert held.held > 0  # a lease slice is out while the replica may still spend it
    await mesh.proxy.budget.close()
    status = await mesh.budget_status("t_a")
    _, fake_in, fake_out = fake_totals(mesh.fake, mesh.proxy.proxy.opaque_user_id("t_a"))
    assert (status.used, status.held) == (fake_in + fake_out, 0)

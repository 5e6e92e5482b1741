"""Upstream failures map to precise statuses; only failures that did no upstream work are retried."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from bulkhead.inference.v1 import inference_pb2 as pb
from shared.errors import error_details
from testkit.fake_anthropic import Fault

from .helpers import params


async def _fail(mesh, *, stream: bool = False):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if stream:
            async for _ in mesh.stub.StreamMessage(pb.StreamMessageRequest(params=params()), metadata=mesh.md("t_a")):
                pass
        else:
            await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=mesh.md("t_a"))
    return info.value.code(), error_details(info.value)


@pytest.mark.parametrize("stream", [False, True])
async def test_429_with_long_retry_after_is_resource_exhausted_with_retry_info(mesh, stream):
    """A 429 asking for a longer wait than the proxy waits out: RESOURCE_EXHAUSTED carrying that delay, no retry."""
    mesh.fake.fail_next(Fault.http(429, retry_after=30))
    code, details = await _fail(mesh, stream=stream)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details["reason"] == "UPSTREAM_RATE_LIMITED"
    assert details["retry_after"] == 30 and details["quota"]
    assert mesh.fake.request_count == 1


@pytest.mark.parametrize("fault", [Fault.http(500), Fault.overloaded(), Fault.http(503)])
async def test_5xx_and_overload_are_retried_then_unavailable(mesh, fault):
    """5xx and 529 are retried with backoff (3 attempts), then UNAVAILABLE; nothing is metered."""
    mesh.fake.fail_next(fault, fault, fault)
    code, details = await _fail(mesh)
    assert code == grpc.StatusCode.UNAVAILABLE and details["reason"] == "UPSTREAM_UNAVAILABLE"
    assert mesh.fake.request_count == 3
    await mesh.settle()
    assert await mesh.metered("t_a") == []


async def test_overload_then_success_is_served(mesh):
    """One 529 then a reply: the caller sees only the reply."""
    mesh.fake.fail_next(Fault.overloaded())
    resp = await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=mesh.md("t_a"))
    assert resp.content[0].text.text.startswith("Echo:") and mesh.fake.request_count == 2


async def test_400_is_invalid_argument_and_not_retried(mesh):
    """An upstream 400 is INVALID_ARGUMENT with the upstream's reason, not retried."""
    mesh.fake.fail_next(Fault.http(400))
    code, details = await _fail(mesh)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details["reason"] == "UPSTREAM_INVALID_REQUEST"
    assert mesh.fake.request_count == 1


async def test_rejected_key_is_failed_precondition(mesh):
    """An upstream 401 is FAILED_PRECONDITION (the provider key is wrong), not retried."""
    mesh.fake.fail_next(Fault.http(401))
    code, details = await _fail(mesh)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and details["reason"] == "PROVIDER_KEY_REJECTED"
    assert mesh.fake.request_count == 1


async def test_connection_dropped_after_request_is_not_retried(mesh):
    """The upstream drops the connection after receiving the request: it may have done the work, so no retry."""
    mesh.fake.fail_next(Fault.disconnect())
    code, details = await _fail(mesh)
    assert code == grpc.StatusCode.UNAVAILABLE and details["reason"] == "UPSTREAM_UNAVAILABLE"
    assert mesh.fake.request_count == 1


async def test_failed_call_returns_its_budget_hold(mesh):
    """A call that fails upstream frees its hold: a budget that fits one call still serves the next one."""
    from .test_quotas import _reservation

    await mesh.set_budget("t_a", _reservation(params()) + 5)
    mesh.fake.fail_next(Fault.http(400))
    await _fail(mesh)
    await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=mesh.md("t_a"))
    assert mesh.fake.request_count == 2


async def test_finished_unary_calls_are_not_kept(mesh):
    """A unary call's task is tracked (close() waits for it) only until it ends, failed or served: one done
    callback drops it from the proxy's tasks and keeps just the reply for retries."""
    mesh.fake.fail_next(Fault.http(400))
    code, _ = await _fail(mesh)
    resp = await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=mesh.md("t_a"))
    await asyncio.sleep(0)  # the done callbacks run in the loop turn after the task ends
    assert code == grpc.StatusCode.INVALID_ARGUMENT and resp.content[0].text.text.startswith("Echo:")
    assert not mesh.proxy.proxy._tasks

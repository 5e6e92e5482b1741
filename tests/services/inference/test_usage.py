"""Metering sees exactly the usage the upstream reported: after retries, client disconnects and outages."""

from __future__ import annotations

import dataclasses
import time

import grpc
import pytest

from bulkhead.inference.v1 import inference_pb2 as pb
from services.inference.budget import Tokens
from services.inference.store import SqlOutbox
from services.inference.usage import UsageEvent
from services.metering.server import MIGRATIONS as METERING_MIGRATIONS
from services.metering.server import serve_metering
from shared.db import Database
from shared.errors import error_details
from shared.tenancy import TenantContext
from testkit.fake_anthropic import Fault, Reply

from .helpers import PINNED, fake_totals, params


async def _metered_equals_fake(mesh, tenant_id: str) -> tuple[int, int, int]:
    await mesh.settle()
    calls, fake_in, fake_out = fake_totals(mesh.fake, mesh.proxy.proxy.opaque_user_id(tenant_id))
    rows = await mesh.metered(tenant_id)
    assert [(model, events, i, o) for model, events, i, o, _ in rows] == [(PINNED, calls, fake_in, fake_out)]
    return calls, fake_in, fake_out


async def test_usage_recorded_once_after_upstream_retries(mesh):
    """A 429 and a 500 are retried; the one successful reply is metered once, under the request id."""
    mesh.fake.fail_next(Fault.http(429, retry_after=0.01), Fault.http(500))
    resp = await mesh.stub.CreateMessage(
        pb.CreateMessageRequest(params=params("count me once")),
        metadata=(*mesh.md("t_a"), ("x-request-id", "req-retry-1")),
    )
    assert mesh.fake.request_count == 3 and resp.call.request_id == "req-retry-1"
    assert await _metered_equals_fake(mesh, "t_a") == (1, resp.usage.input_tokens, resp.usage.output_tokens)


async def test_replayed_request_id_gets_the_first_reply_without_a_second_upstream_call(mesh):
    """A client retry with the same request id is answered from the first call: one upstream call, one event."""
    md = (*mesh.md("t_a"), ("x-request-id", "req-dup"))
    first = await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=md)
    again = await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=md)
    assert again == first and mesh.fake.request_count == 1
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params("something else")), metadata=md)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(info.value)["reason"] == "REQUEST_ID_REUSED"
    other = await mesh.stub.CreateMessage(
        pb.CreateMessageRequest(params=params()), metadata=(*mesh.md("t_b"), ("x-request-id", "req-dup"))
    )
    assert other.id != first.id  # request ids are per tenant
    assert await _metered_equals_fake(mesh, "t_a") == (1, first.usage.input_tokens, first.usage.output_tokens)


async def test_failed_call_can_be_retried_with_the_same_request_id(mesh):
    """A call that failed upstream is not remembered: its retry reaches the upstream."""
    md = (*mesh.md("t_a"), ("x-request-id", "req-failed"))
    mesh.fake.fail_next(Fault.http(400))
    with pytest.raises(grpc.aio.AioRpcError):
        await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=md)
    await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=md)
    assert mesh.fake.request_count == 2


async def test_streamed_call_metered_from_final_usage_event(mesh):
    """A streamed call is metered with the final cumulative usage, equal to the upstream's."""
    mesh.fake.script(Reply.text("one two three four five six", usage={"input_tokens": 9, "output_tokens": 21}))
    events = [
        e async for e in mesh.stub.StreamMessage(pb.StreamMessageRequest(params=params()), metadata=mesh.md("t_a"))
    ]
    assert events[-1].HasField("message_stop")
    assert await _metered_equals_fake(mesh, "t_a") == (1, 9, 21)


async def test_client_disconnect_mid_stream_still_metered(mesh):
    """The caller cancels after two events; the proxy reads the stream to its end and meters the full usage."""
    mesh.fake.event_delay = 0.02
    mesh.fake.script(Reply.text(" ".join(f"w{i}" for i in range(40)), usage={"input_tokens": 4, "output_tokens": 40}))
    call = mesh.stub.StreamMessage(pb.StreamMessageRequest(params=params()), metadata=mesh.md("t_a"))
    seen = 0
    async for _ in call:
        seen += 1
        if seen == 2:
            call.cancel()
            break
    assert seen == 2
    await mesh.settle()
    (record,) = mesh.fake.usage_log
    assert record.completed and mesh.fake.sent_events[-1][-1]["type"] == "message_stop"
    assert await _metered_equals_fake(mesh, "t_a") == (1, 4, 40)


async def test_upstream_drop_mid_stream_meters_what_was_reported(mesh):
    """The upstream drops the stream: the caller gets UNAVAILABLE and metering gets the usage reported so far."""
    mesh.fake.fail_next(Fault.disconnect(after_events=3))
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for event in mesh.stub.StreamMessage(pb.StreamMessageRequest(params=params()), metadata=mesh.md("t_a")):
            got.append(event)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_details(info.value)["reason"] == "UPSTREAM_UNAVAILABLE"
    assert got and got[0].HasField("message_start") and mesh.fake.request_count == 1  # never retried mid-stream
    (record,) = mesh.fake.usage_log
    assert not record.completed
    await _metered_equals_fake(mesh, "t_a")


async def test_metering_outage_goes_to_outbox_and_drains_in_order_after_restart(mesh):
    """Metering down: calls under a held lease still run, usage waits in the outbox, then is delivered exactly once."""
    await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=mesh.md("t_a"))
    await mesh.settle()
    db_file = mesh.tmp / "metering.db"
    await mesh.metering.stop(grace=0)
    for i in range(3):
        await mesh.stub.CreateMessage(
            pb.CreateMessageRequest(params=params(f"during outage {i}")),
            metadata=(*mesh.md("t_a"), ("x-request-id", f"req-outage-{i}")),
        )
    await mesh.stop_proxy(mesh.proxies[0])  # restart: only the outbox remembers the three calls
    outbox_db = await Database.open(f"sqlite+aiosqlite:///{mesh.tmp / 'inference.db'}")
    kept = await SqlOutbox(outbox_db).pending("t_a", 10)
    await outbox_db.close()
    assert [e.idempotency_key for _, e in kept] == ["req-outage-0", "req-outage-1", "req-outage-2"]

    mdb = await Database.open(f"sqlite+aiosqlite:///{db_file}", migrations=str(METERING_MIGRATIONS))
    mesh.metering = await serve_metering(
        db=mdb, verifier=mesh.tokens.verifier, price_cache_s=0, address=mesh.metering.running.address
    )
    proxy = await mesh.start_proxy()
    assert proxy.service.meter.backlogged_tenants == {"t_a"}
    await proxy.stub.CreateMessage(pb.CreateMessageRequest(params=params("after")), metadata=mesh.md("t_a"))
    assert await _metered_equals_fake(mesh, "t_a") == (
        5,
        *fake_totals(mesh.fake, proxy.service.proxy.opaque_user_id("t_a"))[1:],
    )
    assert await proxy.service.outbox.count() == 0


async def test_outbox_redelivery_is_not_double_counted(mesh):
    """An event delivered but not yet deleted (a crash) is sent again from the outbox: metering counts it once."""
    resp = await mesh.stub.CreateMessage(
        pb.CreateMessageRequest(params=params()), metadata=(*mesh.md("t_a"), ("x-request-id", "req-once"))
    )
    await mesh.settle()
    event = UsageEvent(
        "t_a",
        "req-once",
        "p_test",
        "",
        "",
        PINNED,
        Tokens(resp.usage.input_tokens, resp.usage.output_tokens),
        1,
        "success",
        time.time(),
    )
    await mesh.proxy.outbox.append([event, event])
    ctx = TenantContext("t_a", "p_test", frozenset({"*"}), token=mesh.tokens.mint("t_a"), request_id="r")
    mesh.proxy.meter.record(ctx, dataclasses.replace(event, idempotency_key="req-next"))
    mesh.proxy.meter._backlogged.add("t_a")
    await mesh.proxy.meter.flush()
    assert await mesh.proxy.outbox.count() == 0
    (row,) = await mesh.metered("t_a")
    assert row[1] == 2 and row[2] == 2 * resp.usage.input_tokens

"""What the interceptor records of each call: its server span (name, kind, parent, attributes, status) and its
Prometheus counter and histogram samples, for answered, failed, refused and public calls."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import REGISTRY

from bulkhead.testing.v1 import echo_pb2, echo_pb2_grpc
from shared.metrics import tenant_label
from shared.server import serve
from testkit.echo import echo_binding
from testkit.tokens import TestTokens

SERVICE = "bulkhead.testing.v1.EchoService"
TRACE_ID, PARENT_ID = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
TRACEPARENT = ("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01")


@pytest.fixture
async def echo(spans):
    tokens = TestTokens()
    running = await serve(name="observed", bindings=[echo_binding()], verifier=tokens.verifier, tls=None)
    channel = grpc.aio.insecure_channel(running.address)
    yield tokens, echo_pb2_grpc.EchoServiceStub(channel)
    await channel.close()
    await running.stop(0)


def _requests(method: str, tenant: str, code: str) -> float:
    # A tenant's label (and "unauthenticated") is itself only among the first MAX_TENANT_LABELS a process sees,
    # "other" after: the whole suite, in one process, sees more than that before this test. "public" is fixed.
    label = tenant if tenant == "public" else tenant_label(tenant)
    labels = {"service": "observed", "method": f"/{SERVICE}/{method}", "tenant": label, "code": code}
    return REGISTRY.get_sample_value("bulkhead_rpc_requests_total", labels) or 0.0


def _timed(method: str) -> float:
    labels = {"service": "observed", "method": f"/{SERVICE}/{method}"}
    return REGISTRY.get_sample_value("bulkhead_rpc_latency_seconds_count", labels) or 0.0


def _server_span(spans, method: str):
    (span,) = [s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER and s.name == f"/{SERVICE}/{method}"]
    return span


def _rpc(method: str) -> dict:
    return {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method}


async def test_an_answered_call_is_one_span_joined_to_the_callers_trace_and_counted(echo, spans):
    tokens, stub = echo
    before, timed = _requests("Echo", "t_seen", "OK"), _timed("Echo")
    md = (*tokens.metadata("t_seen"), ("x-request-id", "r-obs-1"), TRACEPARENT)
    await stub.Echo(echo_pb2.EchoRequest(message="hi"), metadata=md)
    span = _server_span(spans, "Echo")
    assert f"{span.context.trace_id:032x}" == TRACE_ID and f"{span.parent.span_id:016x}" == PARENT_ID
    assert span.parent.is_remote
    assert dict(span.attributes) == {
        **_rpc("Echo"),
        "tenant.id": "t_seen",
        "bulkhead.request_id": "r-obs-1",
        "rpc.grpc.status_code": 0,
    }
    assert span.status.status_code is StatusCode.UNSET
    assert _requests("Echo", "t_seen", "OK") == before + 1 and _timed("Echo") == timed + 1


async def test_a_stream_without_traceparent_is_a_root_span(echo, spans):
    tokens, stub = echo
    before = _requests("EchoStream", "t_seen", "OK")
    stream = stub.EchoStream(echo_pb2.EchoStreamRequest(count=2), metadata=tokens.metadata("t_seen"))
    replies = [r async for r in stream]
    assert len(replies) == 2
    span = _server_span(spans, "EchoStream")
    assert span.parent is None
    attributes = dict(span.attributes)
    assert len(attributes.pop("bulkhead.request_id")) == 32
    assert attributes == {**_rpc("EchoStream"), "tenant.id": "t_seen", "rpc.grpc.status_code": 0}
    assert _requests("EchoStream", "t_seen", "OK") == before + 1


@pytest.mark.parametrize(("fail_with", "code"), [("not_found", "NOT_FOUND"), ("crash", "INTERNAL")])
async def test_a_failed_call_has_an_error_span_and_is_counted_with_its_code(echo, spans, fail_with, code):
    tokens, stub = echo
    before, timed = _requests("Echo", "t_seen", code), _timed("Echo")
    md = (*tokens.metadata("t_seen"), ("x-request-id", "r-obs-2"), TRACEPARENT)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Echo(echo_pb2.EchoRequest(fail_with=fail_with), metadata=md)
    assert info.value.code().name == code
    span = _server_span(spans, "Echo")
    assert f"{span.parent.span_id:016x}" == PARENT_ID
    assert dict(span.attributes) == {
        **_rpc("Echo"),
        "tenant.id": "t_seen",
        "bulkhead.request_id": "r-obs-2",
        "rpc.grpc.status_code": grpc.StatusCode[code].value[0],
    }
    assert span.status.status_code is StatusCode.ERROR and span.status.description == code
    assert _requests("Echo", "t_seen", code) == before + 1 and _timed("Echo") == timed + 1


async def test_a_refused_call_has_an_error_span_without_tenant_and_is_counted_not_timed(echo, spans):
    tokens, stub = echo
    before, timed = _requests("Echo", "t_owner", "PERMISSION_DENIED"), _timed("Echo")
    token = tokens.mint("t_owner")
    md = (("authorization", f"Bearer {token}"), ("x-tenant-id", "t_other"), TRACEPARENT)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Echo(echo_pb2.EchoRequest(), metadata=md)
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    span = _server_span(spans, "Echo")
    assert f"{span.parent.span_id:016x}" == PARENT_ID
    assert dict(span.attributes) == {**_rpc("Echo"), "rpc.grpc.status_code": 7}
    assert span.status.status_code is StatusCode.ERROR and span.status.description == "PERMISSION_DENIED"
    assert _requests("Echo", "t_owner", "PERMISSION_DENIED") == before + 1 and _timed("Echo") == timed


async def test_an_unauthenticated_call_is_counted_as_unauthenticated(echo, spans):
    _, stub = echo
    before = _requests("Echo", "unauthenticated", "UNAUTHENTICATED")
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Echo(echo_pb2.EchoRequest(), metadata=(("x-tenant-id", "t_seen"),))
    assert _requests("Echo", "unauthenticated", "UNAUTHENTICATED") == before + 1


async def test_a_public_call_has_no_tenant_on_its_span_and_is_counted_as_public(echo, spans):
    _, stub = echo
    before = _requests("PublicEcho", "public", "OK")
    await stub.PublicEcho(echo_pb2.PublicEchoRequest(message="x"))
    assert dict(_server_span(spans, "PublicEcho").attributes) == {**_rpc("PublicEcho"), "rpc.grpc.status_code": 0}
    assert _requests("PublicEcho", "public", "OK") == before + 1

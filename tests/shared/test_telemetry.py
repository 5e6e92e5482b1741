"""Spans: one trace across a service hop, tenant.id on server spans, no token in any attribute."""

from __future__ import annotations

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bulkhead.testing.v1 import echo_pb2, echo_pb2_grpc
from shared import telemetry
from shared.client import make_channel
from shared.server import Binding, serve
from shared.tenancy import require_tenant
from testkit.echo import echo_binding
from testkit.tokens import TestTokens


class Relay(echo_pb2_grpc.EchoServiceServicer):
    """Calls the next service with the caller's identity forwarded."""

    def __init__(self, address: str):
        self.channel = make_channel(address, forward=True)

    async def Echo(self, request, context):
        require_tenant()
        return await echo_pb2_grpc.EchoServiceStub(self.channel).Echo(request)


async def _relay_once(tokens: TestTokens, tenant: str):
    """client → relay → echo, once: the client's metadata and the answer."""
    inner = await serve(name="inner", bindings=[echo_binding()], verifier=tokens.verifier)
    relay = Relay(inner.address)
    outer = await serve(
        name="outer",
        verifier=tokens.verifier,
        bindings=[
            Binding(
                echo_pb2_grpc.add_EchoServiceServicer_to_server,
                relay,
                echo_pb2.DESCRIPTOR.services_by_name["EchoService"],
            )
        ],
    )
    md = tokens.metadata(tenant)
    try:
        async with make_channel(outer.address) as channel:
            resp = await echo_pb2_grpc.EchoServiceStub(channel).Echo(echo_pb2.EchoRequest(message="hi"), metadata=md)
    finally:
        await relay.channel.close()
        await outer.stop(0)
        await inner.stop(0)
    return md, resp


async def test_one_trace_across_a_hop_with_tenant_on_every_server_span(spans):
    """client → relay → echo: one trace id, parent/child links, tenant.id on both server spans, no token."""
    md, resp = await _relay_once(TestTokens(), "t_traced")
    assert resp.seen.tenant_id == "t_traced"
    finished = spans.get_finished_spans()
    server_spans = [s for s in finished if s.kind.name == "SERVER"]
    assert len(server_spans) == 2
    assert len({s.context.trace_id for s in finished}) == 1
    assert all(s.attributes.get("tenant.id") == "t_traced" for s in server_spans)
    outer_span, inner_span = sorted(server_spans, key=lambda s: s.start_time)
    by_id = {s.context.span_id: s for s in finished}
    hop = by_id[inner_span.parent.span_id]  # the relay's client span ...
    assert hop.kind.name == "CLIENT" and hop.parent.span_id == outer_span.context.span_id  # ... inside the outer call
    token = md[0][1].split()[1]
    assert all(token not in str(v) for s in finished for v in s.attributes.values())


async def test_without_an_exporter_a_hop_makes_no_client_span_and_keeps_the_trace(spans, monkeypatch):
    """Where this process exports no span, a CLIENT span per outgoing call is work for nothing: the caller's
    trace context goes on as it is, so the next service's span is a child of the relay's server span."""
    monkeypatch.setattr(telemetry, "exporting", lambda: False)
    await _relay_once(TestTokens(), "t_untraced")
    finished = spans.get_finished_spans()
    assert [s.kind.name for s in finished] == ["SERVER", "SERVER"]
    inner_span, outer_span = finished  # the inner call ends first
    assert inner_span.context.trace_id == outer_span.context.trace_id
    assert inner_span.parent is not None and inner_span.parent.span_id == outer_span.context.span_id


def test_a_provider_exports_once_a_span_processor_is_added():
    provider = telemetry._Provider()
    assert not provider.exporting
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    assert provider.exporting

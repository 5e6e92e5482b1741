"""No provider key or token ever appears in logs, spans, error messages or stored state; calls are tagged."""

from __future__ import annotations

import io
import logging

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bulkhead.inference.v1 import inference_pb2 as pb
from shared.logs import JsonFormatter, ScrubFilter
from shared.telemetry import setup_telemetry
from testkit.fake_anthropic import Fault

from .helpers import PLATFORM_KEY, params

TENANT_KEY = "sk-ant-tenant-a-do-not-leak-0123456789"


@pytest.fixture
def spans():
    """Every span finished during the test."""
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    setup_telemetry("tests").add_span_processor(processor)
    yield exporter
    processor.shutdown()


@pytest.fixture
def log_output():
    """Everything logged during the test, through the production JSON formatter and scrubber."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("inference"))
    handler.addFilter(ScrubFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    # The proxy and the HTTP stack under it at DEBUG: the SDK logs request options there.
    chatty = [logging.getLogger(name) for name in ("bulkhead", "anthropic", "httpx2", "httpcore2")]
    levels = [lg.level for lg in chatty]
    for lg in chatty:
        lg.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    for lg, level in zip(chatty, levels, strict=True):
        lg.setLevel(level)


async def test_no_secret_in_logs_spans_errors_or_state(spans, log_output, mesh):
    """Tenant and platform keys and bearer tokens stay out of logs, span attributes, errors and the database."""
    await mesh.put_tenant_key("t_a", TENANT_KEY)
    md = mesh.md("t_a", agent_id="agent-7", run_id="run-9")
    token = dict(md)["authorization"].split()[1]
    await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=md)
    [e async for e in mesh.stub.StreamMessage(pb.StreamMessageRequest(params=params()), metadata=md)]
    mesh.fake.fail_next(Fault.http(400, message=f"invalid request: key {TENANT_KEY} has no access"), Fault.http(401))
    details = []
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=md)
        details.append(info.value.details() + str(info.value.trailing_metadata()))
    await mesh.settle()
    assert mesh.fake.calls[0].headers["authorization"] == f"Bearer {TENANT_KEY}"  # the key really was used

    logged = log_output.getvalue()
    attributes = " ".join(f"{k}={v}" for s in spans.get_finished_spans() for k, v in (s.attributes or {}).items())
    stored = (mesh.tmp / "inference.db").read_bytes()
    for secret in (TENANT_KEY, PLATFORM_KEY, token):
        assert secret not in logged and secret not in attributes and secret not in " ".join(details)
        assert secret.encode() not in stored
    assert "has no access" in details[0]  # the upstream's message still reaches the caller, redacted

    call_line = next(line for line in logged.splitlines() if '"message": "model call"' in line)
    for tag in ('"tenant_id": "t_a"', '"agent_id": "agent-7"', '"run_id": "run-9"', '"request_id"', '"trace_id"'):
        assert tag in call_line
    server_spans = [
        s for s in spans.get_finished_spans() if s.name.endswith("/CreateMessage") and s.kind == trace.SpanKind.SERVER
    ]
    assert server_spans and all(s.attributes.get("tenant.id") == "t_a" for s in server_spans)
    tagged = [s for s in server_spans if s.attributes.get("bulkhead.agent_id")]
    assert tagged and tagged[0].attributes["bulkhead.run_id"] == "run-9"

"""A secret value never reaches logs, span attributes, error messages, the audit or any table."""

from __future__ import annotations

import base64
import logging
import secrets

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bulkhead.credentials.v1 import credentials_pb2 as pb
from shared import telemetry
from tests.services.credentials.conftest import expect_error


@pytest.fixture
def spans():
    """Every span finished during the test (the SDK provider is installed if nobody did yet)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = telemetry.setup_telemetry("credentials-test")
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.clear()


def _forms(value: bytes) -> list[bytes]:
    """The value and the encodings it could leak in."""
    return [value, base64.b64encode(value), value.hex().encode()]


async def test_value_appears_nowhere_but_the_get_reply(spans, h, caplog):
    """Logs (unscrubbed, DEBUG), spans, error messages and every table stay free of the value."""
    caplog.set_level(logging.DEBUG)
    value = f"sk-live-{secrets.token_hex(16)}".encode()
    await h.put("payment-key", value)
    assert (await h.get("payment-key")).value == value
    errors = []
    for call in (
        h.put("payment-key", value, cas=0),  # CAS conflict
        h.put("payment-key", value, tenant=h.beta, cas=5),  # conflict in another tenant
        h.get("payment-key", tenant=h.beta),  # cross-tenant probe
        h.put("bad/name", value),  # invalid name
        h.stub.Decrypt(pb.DecryptRequest(ciphertext=value), metadata=h.md()),
    ):  # value as ciphertext
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        errors.append(f"{info.value.details()} {info.value.trailing_metadata()} {info.value.debug_error_string()}")
    await h.stub.RotateSecret(pb.RotateSecretRequest(name="payment-key"), metadata=h.md())
    await h.stub.DeleteSecret(pb.DeleteSecretRequest(name="payment-key"), metadata=h.md())

    forms = _forms(value)
    text_forms = [f.decode() for f in forms]
    log_text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert not any(f in log_text for f in text_forms)
    span_text = repr(
        [(s.name, dict(s.attributes or {}), [e.attributes for e in s.events]) for s in spans.get_finished_spans()]
    )
    assert spans.get_finished_spans() and not any(f in span_text for f in text_forms)
    assert len(errors) == 5 and not any(f in e for e in errors for f in text_forms)
    tables = [r[0] for r in await h.raw("SELECT name FROM sqlite_master WHERE type = 'table'")]
    dump = b""
    for table in tables:
        for row in await h.raw(f'SELECT * FROM "{table}"'):
            dump += repr(tuple(row)).encode()
    assert b"payment-key" in dump  # the dump does see our rows...
    assert not any(f in dump for f in forms)  # ...but never the value


async def test_tenant_vault_tokens_stay_out_of_logs_and_errors(vh, caplog):
    """The per-tenant OpenBao token is never logged or put in an error."""
    import asyncio

    from services.credentials.backend import TenantRef

    caplog.set_level(logging.DEBUG)
    await vh.put("k", b"some-value")
    await expect_error(grpc.StatusCode.NOT_FOUND, vh.get("k", version=9))
    token = await asyncio.to_thread(vh.service.backend.tokens.token_for, TenantRef(vh.alpha))
    assert token and not any(token in f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert token not in repr(vh.service.backend.tokens.__dict__.get("_admin_token"))

"""Encryption at rest: raw SQL sees only ciphertext; other tenants' keys and rows do not decrypt."""

from __future__ import annotations

import base64
import logging

import grpc
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bulkhead.state.v1 import state_pb2
from services.state.datakeys import DataKeyRejected, LocalDataKeyProvider
from services.state.envelope import UndecryptableData
from services.state.threads import event_aad
from shared import telemetry
from shared.tenancy import TenantContext, tenant_scope
from tests.services.state.conftest import (
    ALPHA,
    BETA,
    StateHarness,
    expect_error,
    replay,
)

SECRET = b"TOP-SECRET-PAYLOAD-7f3a"
TEAM = state_pb2.ContextScope(kind=state_pb2.SCOPE_KIND_TEAM, id="team")


def _as(tenant: str) -> TenantContext:
    return TenantContext(tenant_id=tenant, principal_id="p_test", scopes=frozenset({"*"}))


async def _write_secrets(h: StateHarness, tenant: str = ALPHA) -> str:
    thread = await h.new_thread(tenant, thread_id="secret-thread")
    await h.append(thread.thread_id, SECRET, SECRET + b"-2", tenant=tenant)
    await h.stub.CreateSnapshot(
        state_pb2.CreateSnapshotRequest(thread_id=thread.thread_id, version=1, state=SECRET + b"-snap"),
        metadata=h.md(tenant),
    )
    await h.stub.PutContext(
        state_pb2.PutContextRequest(scope=TEAM, key="k", value=SECRET + b"-ctx"), metadata=h.md(tenant)
    )
    return thread.thread_id


async def test_raw_sql_shows_only_ciphertext(any_state: StateHarness):
    """Payloads, snapshots and context values are ciphertext in the database; no plain key is stored."""
    h = any_state
    await _write_secrets(h)
    blobs = []
    for sql in (
        "SELECT payload FROM state_events",
        "SELECT state FROM state_snapshots",
        "SELECT value FROM state_context",
        "SELECT wrapped FROM state_data_keys",
    ):
        rows = await h.raw(sql, tenant=ALPHA)
        assert rows, sql
        blobs += [bytes(r[0]) for r in rows]
    assert all(b"SECRET" not in blob for blob in blobs)
    # The metadata needed for queries stays in clear.
    rows = await h.raw("SELECT thread_id, version, event_type, key_id FROM state_events ORDER BY version", tenant=ALPHA)
    assert [tuple(r)[:3] for r in rows] == [("secret-thread", 1, "message"), ("secret-thread", 2, "message")]
    assert rows[0][3].startswith("dk_")
    # The plain key is nowhere in the database: it cannot open what is stored under it.
    wrapped = bytes((await h.raw("SELECT wrapped FROM state_data_keys", tenant=ALPHA))[0][0])
    payload = bytes((await h.raw("SELECT payload FROM state_events WHERE version = 1", tenant=ALPHA))[0][0])
    for start in range(len(wrapped) - 31):
        with pytest.raises(InvalidTag):
            AESGCM(wrapped[start : start + 32]).decrypt(
                payload[1:13], payload[13:], event_aad(ALPHA, "secret-thread", 1)
            )


async def test_postgres_rls_hides_rows_from_raw_sql_without_the_tenant(pg_state: StateHarness):
    """As the runtime role, raw SQL sees A's rows only when app.tenant_id is A (RLS, not just the ORM)."""
    h = pg_state
    await _write_secrets(h)
    assert (await h.raw("SELECT count(*) FROM state_events"))[0][0] == 0
    assert (await h.raw("SELECT count(*) FROM state_events", tenant=BETA))[0][0] == 0
    assert (await h.raw("SELECT count(*) FROM state_events", tenant=ALPHA))[0][0] == 2
    with pytest.raises(Exception, match="row-level security"):
        await h.raw(
            "INSERT INTO state_events (tenant_id, thread_id, version, event_type, key_id, payload, "
            "created_at_us) VALUES ('t_alpha', 'x', 1, 'm', '', '\\x00', 0)",
            tenant=BETA,
        )


async def test_another_tenants_data_key_cannot_decrypt(any_state: StateHarness):
    """B's data key fails on A's ciphertext, and A's wrapped key does not unwrap for B."""
    h = any_state
    await _write_secrets(h)
    await _write_secrets(h, BETA)
    payload = bytes((await h.raw("SELECT payload FROM state_events WHERE version = 1", tenant=ALPHA))[0][0])
    alpha_wrapped = bytes((await h.raw("SELECT wrapped FROM state_data_keys", tenant=ALPHA))[0][0])
    aad = event_aad(ALPHA, "secret-thread", 1)
    with tenant_scope(_as(ALPHA)):
        alpha_key = await h.envelope.current_key()
        assert alpha_key.open(aad, payload) == SECRET
    with tenant_scope(_as(BETA)):
        beta_key = await h.envelope.current_key()
        assert beta_key.key_id != alpha_key.key_id
        with pytest.raises(UndecryptableData):
            beta_key.open(aad, payload)
        with pytest.raises(DataKeyRejected):
            await LocalDataKeyProvider(h.extra["master_key"]).unwrap_data_key(alpha_wrapped)


async def test_ciphertext_moved_to_another_tenant_does_not_decrypt(any_state: StateHarness):
    """A's ciphertext copied into B's row (by someone with database access) reads as an error, never plaintext."""
    h = any_state
    tid = await _write_secrets(h)
    await _write_secrets(h, BETA)
    alpha = (await h.raw("SELECT payload, key_id FROM state_events WHERE version = 1", tenant=ALPHA))[0]
    await h.raw("UPDATE state_events SET payload = :p WHERE version = 1", {"p": bytes(alpha[0])}, tenant=BETA)
    details = await expect_error(grpc.StatusCode.INTERNAL, replay(h, tid, BETA))
    assert details["reason"] == "UNDECRYPTABLE_DATA"
    # Even with A's key id pointed at, B has no such key.
    await h.raw("UPDATE state_events SET key_id = :k WHERE version = 1", {"k": alpha[1]}, tenant=BETA)
    details = await expect_error(
        grpc.StatusCode.INTERNAL, h.stub.ReadEvents(state_pb2.ReadEventsRequest(thread_id=tid), metadata=h.md(BETA))
    )
    assert details["reason"] == "UNDECRYPTABLE_DATA"


async def test_ciphertext_moved_between_versions_does_not_decrypt(state: StateHarness):
    """Swapping two events' ciphertexts within one thread is detected (bound to the version)."""
    tid = await _write_secrets(state)
    rows = await state.raw("SELECT version, payload FROM state_events ORDER BY version")
    await state.raw("UPDATE state_events SET payload = :p WHERE version = 2", {"p": bytes(rows[0][1])})
    details = await expect_error(grpc.StatusCode.INTERNAL, replay(state, tid))
    assert details["reason"] == "UNDECRYPTABLE_DATA"


@pytest.fixture
def spans():
    """Every span finished during the test (the SDK provider is installed if nobody did yet)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = telemetry.setup_telemetry("state-test")
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.clear()


async def test_payloads_and_keys_reach_no_log_span_error_or_audit(state: StateHarness, caplog, spans):
    """Payloads, the plain data key and tokens appear in no log record, span, error or audit row."""
    caplog.set_level(logging.DEBUG)
    tid = await _write_secrets(state)
    await state.stub.ReadEvents(state_pb2.ReadEventsRequest(thread_id=tid), metadata=state.md())
    errors = []
    for call in (
        state.append(tid, SECRET, expected=0),  # version conflict
        state.append(tid, SECRET * 100),  # over the size limit
        state.append(tid, SECRET, tenant=BETA),  # cross-tenant probe
        state.stub.PutContext(
            state_pb2.PutContextRequest(  # CAS conflict
                scope=TEAM, key="k", value=SECRET, expected_revision=7
            ),
            metadata=state.md(),
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        errors.append(f"{info.value.details()} {info.value.trailing_metadata()} {info.value.debug_error_string()}")
    with tenant_scope(_as(ALPHA)):
        plain_key = await LocalDataKeyProvider(state.extra["master_key"]).unwrap_data_key(
            bytes((await state.raw("SELECT wrapped FROM state_data_keys"))[0][0])
        )
    token = dict(state.md())["authorization"].split()[1]
    forbidden = ["SECRET", plain_key.hex(), base64.b64encode(plain_key).decode(), token]
    log_text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    span_text = repr(
        [(s.name, dict(s.attributes or {}), [e.attributes for e in s.events]) for s in spans.get_finished_spans()]
    )
    audit_text = repr(await state.raw("SELECT * FROM state_audit"))
    assert spans.get_finished_spans()
    for text in (log_text, span_text, "\n".join(errors), audit_text):
        assert not any(f in text for f in forbidden)


async def test_plain_keys_are_cached_briefly_then_unwrapped_again(state: StateHarness):
    """After the cache lifetime the envelope unwraps the stored key again (no plain key kept for long)."""
    from services.state.envelope import Envelope
    from services.state.store import DataKeyStore

    calls = []

    class CountingProvider(LocalDataKeyProvider):
        async def unwrap_data_key(self, wrapped):
            calls.append(1)
            return await super().unwrap_data_key(wrapped)

    now = [0.0]
    envelope = Envelope(
        CountingProvider(state.extra["master_key"]), DataKeyStore(state.db), cache_ttl=60, clock=lambda: now[0]
    )
    await _write_secrets(state)
    with tenant_scope(_as(ALPHA)):
        await envelope.current_key()
        await envelope.current_key()
        assert len(calls) == 1
        now[0] = 61.0
        await envelope.current_key()
        assert len(calls) == 2

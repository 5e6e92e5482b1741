"""Refused calls as each tenant's own security events: written to every service's ledger (bounded),
read back only by their tenant through the one SecurityEventsService contract."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from bulkhead.common.v1 import security_events_pb2 as pb
from bulkhead.common.v1 import security_events_pb2_grpc
from bulkhead.credentials.v1 import credentials_pb2 as cred
from bulkhead.credentials.v1 import credentials_pb2_grpc
from bulkhead.state.v1 import state_pb2 as st
from bulkhead.state.v1 import state_pb2_grpc
from services.credentials.local_backend import LocalBackend
from services.credentials.server import MIGRATIONS as CREDENTIALS_MIGRATIONS
from services.credentials.server import serve_credentials
from services.state.envelope import PlaintextEnvelope
from services.state.server import MIGRATIONS as STATE_MIGRATIONS
from services.state.server import serve_state
from services.state.store import StateBase
from shared.db import Database
from shared.errors import error_details
from shared.lifecycle import TenantLifecycle
from shared.security import SecurityEvents
from shared.security_events import RETENTION_S, SECURITY_EVENTS_METADATA, TABLE, Refusal, SecurityLedger
from shared.server import RunningServer
from shared.tiers import Tier
from testkit.tokens import TestTokens

A, B = "t_secalpha", "t_secbeta"
LIST_THREADS = "/bulkhead.state.v1.StateService/ListThreads"
LIST_SECRETS = "/bulkhead.credentials.v1.CredentialsService/ListSecrets"


@dataclass
class Mesh:
    """state and credentials, each with its own database, verifying with one test key."""

    tokens: TestTokens
    servers: dict[str, RunningServer]
    dbs: dict[str, Database]
    channels: dict[str, grpc.aio.Channel]
    tier: str = "pooled"

    def md(self, tenant: str, scopes=("*",), *, claimed: str | None = None, **kw) -> tuple[tuple[str, str], ...]:
        token = self.tokens.mint(tenant, scopes, tier=self.tier, **kw)
        return (("authorization", f"Bearer {token}"), ("x-tenant-id", claimed or tenant))

    def events(self, service: str) -> security_events_pb2_grpc.SecurityEventsServiceStub:
        return security_events_pb2_grpc.SecurityEventsServiceStub(self.channels[service])

    async def flush(self) -> None:
        """Write every server's pending refusals now (instead of waiting for the 5 s flush)."""
        for running in self.servers.values():
            for work in running.background:
                await work.flush()

    async def listed(self, service: str, tenant: str, **request) -> list[pb.SecurityEvent]:
        out, token = [], ""
        while True:
            reply = await self.events(service).ListSecurityEvents(
                pb.ListSecurityEventsRequest(page_token=token, **request), metadata=self.md(tenant)
            )
            out += reply.events
            token = reply.next_page_token
            if not token:
                return out


async def _database(backend: str, name: str, migrations: Path, tmp_path: Path, request) -> Database:
    if backend == "sqlite":
        return await Database.open(f"sqlite+aiosqlite:///{tmp_path / name}.db", migrations=str(migrations))
    urls = await request.getfixturevalue("postgres").create_database(name)
    return await Database.open(urls.app_url, migrations=str(migrations), owner_url=urls.owner_url)


@contextlib.asynccontextmanager
async def running(backend: str, tmp_path: Path, request, tier: str = "pooled") -> AsyncIterator[Mesh]:
    tokens = TestTokens()
    dbs = {
        "state": await _database(backend, "sec_state", STATE_MIGRATIONS, tmp_path, request),
        "credentials": await _database(backend, "sec_credentials", CREDENTIALS_MIGRATIONS, tmp_path, request),
    }
    servers = {"state": await serve_state(db=dbs["state"], envelope=PlaintextEnvelope(), verifier=tokens.verifier)}
    creds = await serve_credentials(
        db=dbs["credentials"], backend=LocalBackend(dbs["credentials"], b"k" * 32), verifier=tokens.verifier
    )
    servers["credentials"] = creds.running
    channels = {name: grpc.aio.insecure_channel(s.address) for name, s in servers.items()}
    try:
        yield Mesh(tokens, servers, dbs, channels, tier)
    finally:
        for ch in channels.values():
            await ch.close()
        await servers["state"].stop(0)
        await creds.stop(0)
        await dbs["state"].close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def mesh(request, tmp_path) -> AsyncIterator[Mesh]:
    async with running(request.param, tmp_path, request) as m:
        yield m


async def _refused(call, *args, **kw) -> dict:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(*args, **kw)
    return error_details(info.value) | {"code": info.value.code()}


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
@pytest.mark.parametrize("tier", ["pooled", "bridge", "silo"])
async def test_b_refusals_on_two_services_show_in_bs_ledgers_never_in_as(backend, tier, tmp_path, request):
    """B spoofs A's x-tenant-id at state and lacks a scope at credentials: both show in B's ListSecurityEvents
    of the service that refused, with B's principal; A sees none of it, and a garbage token naming B is nobody's."""
    async with running(backend, tmp_path, request, tier) as m:
        state = state_pb2_grpc.StateServiceStub(m.channels["state"])
        secrets = credentials_pb2_grpc.CredentialsServiceStub(m.channels["credentials"])
        spoofed = await _refused(
            state.ListThreads, st.ListThreadsRequest(), metadata=m.md(B, principal_id="p_b_prober", claimed=A)
        )
        assert spoofed["reason"] == "TENANT_MISMATCH"
        for _ in range(3):
            lacking = await _refused(
                secrets.ListSecrets,
                cred.ListSecretsRequest(),
                metadata=m.md(B, ("state.threads.read",), principal_id="p_b_bot"),
            )
            assert lacking["reason"] == "MISSING_SCOPE"
        garbage = await _refused(
            state.ListThreads,
            st.ListThreadsRequest(),
            metadata=(("authorization", "Bearer not-a-token"), ("x-tenant-id", B)),
        )
        assert garbage["reason"] == "TOKEN_MALFORMED"
        await state.ListThreads(st.ListThreadsRequest(), metadata=m.md(A))  # A's own calls are not refused
        await m.flush()

        at_state = await m.listed("state", B)
        assert [(e.service, e.method, e.reason, e.principal_id, e.count) for e in at_state] == [
            ("state", LIST_THREADS, "TENANT_MISMATCH", "p_b_prober", 1)
        ]
        at_credentials = await m.listed("credentials", B)
        assert [(e.service, e.method, e.reason, e.principal_id, e.count) for e in at_credentials] == [
            ("credentials", LIST_SECRETS, "MISSING_SCOPE", "p_b_bot", 3)
        ]
        event = at_credentials[0]
        now = time.time()
        assert now - 120 < event.bucket_start_time.seconds <= now and event.bucket_start_time.seconds % 60 == 0
        assert event.bucket_start_time.seconds <= event.last_seen_time.seconds <= now + 1
        for service in ("state", "credentials"):
            assert await m.listed(service, A) == []  # B named A's tenant: still B's event, never A's
        again = await m.listed("credentials", B, reasons=["MISSING_SCOPE"])
        assert again == at_credentials
        assert await m.listed("credentials", B, reasons=["TENANT_MISMATCH"]) == []


async def test_every_replica_answers_with_the_same_figures(mesh):
    """Refusals taken by one state replica are read back, equal, from a second replica over the same database,
    which never saw them (the figures come from the ledger, not from process memory)."""
    second = await serve_state(db=mesh.dbs["state"], envelope=PlaintextEnvelope(), verifier=mesh.tokens.verifier)
    channel = grpc.aio.insecure_channel(second.address)
    try:
        state = state_pb2_grpc.StateServiceStub(mesh.channels["state"])
        for _ in range(4):
            await _refused(state.ListThreads, st.ListThreadsRequest(), metadata=mesh.md(B, claimed=A))
        await mesh.flush()
        assert second.security_events.counts == {}  # the second replica refused nothing itself
        other = security_events_pb2_grpc.SecurityEventsServiceStub(channel)
        here = (
            await mesh.events("state").ListSecurityEvents(pb.ListSecurityEventsRequest(), metadata=mesh.md(B))
        ).events
        there = (await other.ListSecurityEvents(pb.ListSecurityEventsRequest(), metadata=mesh.md(B))).events
        assert [e.count for e in there] == [4] and list(there) == list(here)
    finally:
        await channel.close()
        await second.stop(0)


async def test_only_verified_tokens_are_attributed(mesh):
    """Revoked and recently expired tokens are their tenant's events; a forged, long-expired or suspended
    tenant's refusal is stored for nobody."""
    state = state_pb2_grpc.StateServiceStub(mesh.channels["state"])
    revoked, claims = mesh.tokens.issuer.issue(tenant_id=B, principal_id="p_b_revoked", scopes={"*"})
    mesh.tokens.revoke(claims.jti)
    late, _ = mesh.tokens.issuer.issue(
        tenant_id=B, principal_id="p_b_late", scopes={"*"}, ttl=30, now=time.time() - 100
    )
    ancient, _ = mesh.tokens.issuer.issue(
        tenant_id=B, principal_id="p_b_ancient", scopes={"*"}, ttl=30, now=time.time() - 7200
    )
    forged = TestTokens().mint(B, principal_id="p_b_forged")
    for token, reason in (
        (revoked, "TOKEN_REVOKED"),
        (late, "TOKEN_EXPIRED"),
        (ancient, "TOKEN_EXPIRED"),
        (forged, "TOKEN_UNKNOWN_KEY"),
    ):
        got = await _refused(
            state.ListThreads,
            st.ListThreadsRequest(),
            metadata=(("authorization", f"Bearer {token}"), ("x-tenant-id", B)),
        )
        assert got["reason"] == reason
    await mesh.flush()
    assert sorted((e.reason, e.principal_id) for e in await mesh.listed("state", B)) == [
        ("TOKEN_EXPIRED", "p_b_late"),
        ("TOKEN_REVOKED", "p_b_revoked"),
    ]
    # A suspended tenant: refused everywhere, and nothing written (its rows may be being purged).
    mesh.tokens.keys.suspended = frozenset({A})
    got = await _refused(state.ListThreads, st.ListThreadsRequest(), metadata=mesh.md(A))
    assert got["reason"] == "TENANT_SUSPENDED"
    await mesh.flush()
    mesh.tokens.keys.suspended = frozenset()
    assert await mesh.listed("state", A) == []


async def test_bad_input_gets_precise_reasons(mesh):
    """Window, reasons, page size and page tokens are checked; the reply says which field is wrong."""
    stub = mesh.events("state")
    md = mesh.md(B)

    def ts(seconds: int) -> Timestamp:
        return Timestamp(seconds=seconds)

    now = int(time.time())
    cases = [
        (pb.ListSecurityEventsRequest(start_time=ts(now), end_time=ts(now - 60)), "INVALID_TIME_RANGE", "start_time"),
        (pb.ListSecurityEventsRequest(start_time=ts(now), end_time=ts(now)), "INVALID_TIME_RANGE", "start_time"),
        (pb.ListSecurityEventsRequest(end_time=Timestamp(seconds=-5)), "INVALID_TIME_RANGE", "end_time"),
        (pb.ListSecurityEventsRequest(reasons=["missing_scope"]), "INVALID_REASON", "reasons[0]"),
        (pb.ListSecurityEventsRequest(reasons=["OK"] * 21), "INVALID_REASON", "reasons"),
        (pb.ListSecurityEventsRequest(page_size=-1), None, "page_size"),
        (pb.ListSecurityEventsRequest(page_token="%%%"), "INVALID_PAGE_TOKEN", "page_token"),
    ]
    for request, reason, field in cases:
        got = await _refused(stub.ListSecurityEvents, request, metadata=md)
        assert got["code"] == grpc.StatusCode.INVALID_ARGUMENT, request
        if reason:
            assert got["reason"] == reason, request
        assert field in got["bad_request"], (request, got)


async def test_pages_walk_every_event_once_and_a_token_keeps_its_filter(mesh):
    """page_size=1 walks the events newest minute first, each once; a token used with another filter is refused."""
    ledger = SecurityLedger("state", mesh.dbs["state"])
    now = int(time.time()) // 60 * 60
    rows = [
        Refusal(
            B,
            now - 60 * i,
            f"/bulkhead.state.v1.StateService/M{i % 3}",
            "MISSING_SCOPE",
            "p_b",
            i + 1,
            (now - 60 * i) * 1_000_000,
        )
        for i in range(7)
    ]
    await ledger.write(rows)
    walked, token, first_token = [], "", ""
    while True:
        reply = await mesh.events("state").ListSecurityEvents(
            pb.ListSecurityEventsRequest(page_size=1, page_token=token), metadata=mesh.md(B)
        )
        walked += reply.events
        token = reply.next_page_token
        assert len(reply.events) == 1
        if not token:
            break
        first_token = first_token or token
    assert [e.count for e in walked] == [1, 2, 3, 4, 5, 6, 7]
    assert [e.bucket_start_time.seconds for e in walked] == sorted((r.bucket_start for r in rows), reverse=True)
    got = await _refused(
        mesh.events("state").ListSecurityEvents,
        pb.ListSecurityEventsRequest(page_size=1, page_token=first_token, reasons=["TENANT_MISMATCH"]),
        metadata=mesh.md(B),
    )
    assert got["reason"] == "INVALID_PAGE_TOKEN"
    assert await mesh.listed("state", A) == []


async def test_a_flood_of_refusals_is_a_bounded_number_of_writes(mesh):
    """400 refused calls under 200 principals, with a budget of 20 keys: one flush writes 20 rows; the other
    refusals are counted (metrics), never stored; and one tenant cannot take another's share."""
    events = mesh.servers["state"].security_events
    events.max_keys, events.max_keys_per_tenant = 20, 12
    state = state_pb2_grpc.StateServiceStub(mesh.channels["state"])
    writes: list[int] = []
    ledger_write = SecurityLedger.write

    async def counting(self, refusals):
        writes.append(len(refusals))
        return await ledger_write(self, refusals)

    original, SecurityLedger.write = SecurityLedger.write, counting
    try:
        for i in range(200):
            for _ in range(2):
                await _refused(
                    state.ListThreads,
                    st.ListThreadsRequest(),
                    metadata=mesh.md(B, ("metering.prices.read",), principal_id=f"p_flood_{i}"),
                )
        for i in range(10):
            await _refused(
                state.ListThreads,
                st.ListThreadsRequest(),
                metadata=mesh.md(A, ("metering.prices.read",), principal_id=f"p_a_{i}"),
            )
        assert events.pending == 20
        await mesh.flush()
        await mesh.flush()  # nothing left: no second write
    finally:
        SecurityLedger.write = original
    assert writes == [20]
    b_rows, a_rows = await mesh.listed("state", B), await mesh.listed("state", A)
    assert len(b_rows) == 12 and sum(e.count for e in b_rows) == 24  # each stored key kept both its refusals
    assert len(a_rows) == 8  # A's share was not taken by B's flood (20 - 12)
    assert events.overflow == 400 - 24 + 2  # B's 376 refusals beyond its budget and A's last 2


async def test_the_aggregator_never_holds_more_than_its_budget():
    """The in-memory side alone: any number of refusals, at most max_keys keys; repeats of a key only count."""
    events = SecurityEvents("unit", max_keys=5, max_keys_per_tenant=3, clock=lambda: 1_000_000.0)
    written: list = []

    async def sink(items):
        written.extend(items)

    events.attach(sink)
    for i in range(1000):
        events.denied(
            reason="MISSING_SCOPE",
            method=f"/m{i % 50}",
            peer="",
            tenant_id=f"t_{i % 4}",
            principal_id="p",
            claimed_tenant=None,
            message="no",
        )
    events.denied(
        reason="TOKEN_INVALID",
        method="/m",
        peer="",
        tenant_id=None,
        principal_id=None,
        claimed_tenant=None,
        message="garbage",
    )
    assert events.pending == 5
    await events.flush()
    assert len(written) == 5 and events.pending == 0
    assert sum(w.count for w in written) + events.overflow == 1000  # every refusal counted, 5 keys stored
    assert max(sum(1 for w in written if w.key.tenant_id == t) for t in ("t_0", "t_1", "t_2", "t_3")) <= 3


async def test_retention_sweep_deletes_only_rows_past_thirty_days(mesh):
    """The sweep names no tenant, yet removes every tenant's rows past retention and nothing younger."""
    ledger = SecurityLedger("state", mesh.dbs["state"])
    now = int(time.time()) // 60 * 60
    old, young = now - RETENTION_S - 120, now - RETENTION_S + 3600
    await ledger.write(
        [Refusal(t, b, LIST_THREADS, "MISSING_SCOPE", "p", 1, b * 1_000_000) for t in (A, B) for b in (old, young)]
    )
    assert await ledger.sweep() == 2
    for tenant in (A, B):
        rows = await ledger.read(tenant, start=0, end=now + 60, reasons=[], after=None, limit=10)
        assert [r.bucket_start for r in rows] == [young]


async def test_lifecycle_inventories_and_purges_the_ledger(mesh):
    """Deleting B removes B's security events from the service's ledger (and counts them first); A's stay."""
    ledger = SecurityLedger("state", mesh.dbs["state"])
    now = int(time.time()) // 60 * 60
    await ledger.write([Refusal(t, now, LIST_THREADS, "MISSING_SCOPE", "p", 2, now * 1_000_000) for t in (A, B)])
    lifecycle = TenantLifecycle("state", mesh.dbs["state"], [StateBase.metadata, SECURITY_EVENTS_METADATA])
    counted = {c.table: c.rows for c in await lifecycle.inventory(B, Tier(mesh.tier))}
    assert counted[TABLE] == 1
    purged = await lifecycle.purge(B, Tier(mesh.tier))
    assert {d.table: d.rows for d in purged.deleted}[TABLE] == 1
    assert await mesh.listed("state", B) == []
    assert [e.count for e in await mesh.listed("state", A)] == [2]

"""The state service reading ReadEvents and ListThreads on a real streaming standby: a write answers
with its WAL position, a read carrying it sees the write (the primary answers while the standby's
replay is paused), a read without it sees the standby's stale rows, and the typed client and the
service-to-service channel carry the position by themselves."""

from __future__ import annotations

import asyncpg
import grpc
import pytest

from bulkhead.client import Client
from bulkhead.state.v1 import state_pb2, state_pb2_grpc
from services.state.server import MIGRATIONS
from shared.client import StaticCredentials, make_channel
from shared.db import LSN_HEADER, Database
from shared.db.replica import parse_lsn
from shared.tenancy import TenantContext, tenant_scope
from testkit.tokens import TestTokens

from .conftest import ALPHA, BETA, start_harness, stop_harness

pytestmark = pytest.mark.postgres


async def _pause_replay(pair, paused: bool) -> None:
    conn = await asyncpg.connect(pair.standby_admin_dsn())
    try:
        await conn.execute("SELECT pg_wal_replay_pause()" if paused else "SELECT pg_wal_replay_resume()")
    finally:
        await conn.close()


@pytest.fixture
async def replica_state(postgres_replica):
    """The state service (encrypted) on the pair's primary, reading on its standby; replay paused
    once a thread of ALPHA's exists on both."""
    pair = postgres_replica
    urls = await pair.primary.create_database("state")
    standby = urls.app_dsn.replace(f":{pair.primary_port}/", f":{pair.standby_port}/")
    db = await Database.open(urls.app_url, migrations=str(MIGRATIONS), owner_url=urls.owner_url, read_url=standby)
    h = await start_harness(db, TestTokens(), "postgres", master_key=b"k" * 32)
    await h.new_thread(ALPHA, thread_id="th")
    await pair.wait_replayed()
    await _pause_replay(pair, True)
    yield h, pair
    await stop_harness(h)
    await db.close()


def _events(reply: state_pb2.ReadEventsResponse) -> list[bytes]:
    return [e.payload for e in reply.events]


async def test_append_answers_with_its_lsn_and_a_read_carrying_it_sees_the_write(replica_state):
    """AppendEvents' trailers carry the LSN; ReadEvents with it sees the event, without it the
    standby's stale thread (replay is paused); the other tenant sees nothing either way."""
    h, pair = replica_state
    call = h.stub.AppendEvents(
        state_pb2.AppendEventsRequest(thread_id="th", events=[state_pb2.NewEvent(type="m", payload=b"mine")]),
        metadata=h.md(ALPHA),
    )
    await call
    lsn = dict(await call.trailing_metadata()).get(LSN_HEADER)
    assert parse_lsn(lsn) is not None, lsn

    read = state_pb2.ReadEventsRequest(thread_id="th")
    stale = await h.stub.ReadEvents(read, metadata=h.md(ALPHA))
    assert (_events(stale), stale.thread_version) == ([], 0)
    fresh = await h.stub.ReadEvents(read, metadata=(*h.md(ALPHA), (LSN_HEADER, lsn)))
    assert (_events(fresh), fresh.thread_version) == ([b"mine"], 1)

    listed = await h.stub.ListThreads(state_pb2.ListThreadsRequest(), metadata=(*h.md(ALPHA), (LSN_HEADER, lsn)))
    assert [(t.thread_id, t.version) for t in listed.threads] == [("th", 1)]
    others = await h.stub.ListThreads(state_pb2.ListThreadsRequest(), metadata=(*h.md(BETA), (LSN_HEADER, lsn)))
    assert list(others.threads) == []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await h.stub.ReadEvents(read, metadata=(*h.md(BETA), (LSN_HEADER, lsn)))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    await _pause_replay(pair, False)
    await pair.wait_replayed()
    caught_up = await h.stub.ReadEvents(read, metadata=h.md(ALPHA))
    assert _events(caught_up) == [b"mine"]


async def test_the_typed_client_reads_its_own_writes(replica_state):
    """bulkhead.client keeps the LSN AppendEvents answered with and sends it on ReadEvents."""
    h, _ = replica_state
    client = await Client.connect(token=h.tokens.mint(ALPHA), tenant_id=ALPHA, addresses={"state": h.running.address})
    async with client:
        await client.state.AppendEvents(
            state_pb2.AppendEventsRequest(thread_id="th", events=[state_pb2.NewEvent(type="m", payload=b"typed")])
        )
        reply = await client.state.ReadEvents(state_pb2.ReadEventsRequest(thread_id="th"))
    assert _events(reply) == [b"typed"]


@pytest.mark.parametrize("how", ["forward", "static"])
async def test_service_channels_read_their_tenants_own_writes(replica_state, how: str):
    """make_channel's forwarding and static-credential channels carry the tenant's LSN; on the
    forwarding one, only to that tenant's calls: another tenant's read still reads the standby."""
    h, _ = replica_state
    token = h.tokens.mint(ALPHA)
    ctx = TenantContext(tenant_id=ALPHA, principal_id="p_test", scopes=frozenset({"*"}), token=token)
    channel = (
        make_channel(h.running.address, forward=True, tls=None)
        if how == "forward"
        else make_channel(h.running.address, credentials=StaticCredentials(token, ALPHA), tls=None)
    )
    stub = state_pb2_grpc.StateServiceStub(channel)
    try:
        with tenant_scope(ctx):
            await stub.AppendEvents(
                state_pb2.AppendEventsRequest(thread_id="th", events=[state_pb2.NewEvent(type="m", payload=b"relayed")])
            )
            reply = await stub.ReadEvents(state_pb2.ReadEventsRequest(thread_id="th"))
        assert _events(reply) == [b"relayed"]
        # A fresh thread of BETA's, read without an LSN of BETA's: the paused standby has none of it.
        await h.new_thread(BETA, thread_id="tb")
        if how == "forward":
            beta = TenantContext(
                tenant_id=BETA, principal_id="p_test", scopes=frozenset({"*"}), token=h.tokens.mint(BETA)
            )
            with tenant_scope(beta):
                listed = await stub.ListThreads(state_pb2.ListThreadsRequest())
            assert list(listed.threads) == []
    finally:
        await channel.close()

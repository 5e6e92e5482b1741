"""Bridge and silo tenants: the same service keeps their threads in a schema or database of their own."""

from __future__ import annotations

import grpc
import pytest

from bulkhead.state.v1 import state_pb2
from services.state.server import MIGRATIONS
from shared.db import Database, bridge_schema
from tests.services.state.conftest import (
    ALPHA,
    BETA,
    expect_error,
    replay,
    start_harness,
    stop_harness,
)


@pytest.mark.parametrize("tier", ["bridge", "silo"])
async def test_tiered_tenant_state_lives_apart(request, tmp_path, tokens, master_key, tier: str):
    """A bridge/silo tenant's events never land in the pooled tables; other tenants cannot reach them."""
    if tier == "bridge":
        server = request.getfixturevalue("postgres")
        urls = await server.create_database("state_tier")
        db = await Database.open(urls.app_url, migrations=str(MIGRATIONS), owner_url=urls.owner_url)
    else:
        db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}", migrations=str(MIGRATIONS))
    h = await start_harness(db, tokens, "postgres" if tier == "bridge" else "sqlite", master_key=master_key)
    try:
        md = h.md(ALPHA, tier=tier)
        await h.stub.CreateThread(state_pb2.CreateThreadRequest(thread_id="t"), metadata=md)
        await h.stub.AppendEvents(
            state_pb2.AppendEventsRequest(
                thread_id="t", expected_version=0, events=[state_pb2.NewEvent(type="m", payload=b"tiered")]
            ),
            metadata=md,
        )
        items = [i async for i in h.stub.Replay(state_pb2.ReplayRequest(thread_id="t"), metadata=md)]
        assert [i.event.payload for i in items] == [b"tiered"]
        # Nothing in the shared (pooled) tables, whatever tenant the raw query claims to be.
        assert (await h.raw("SELECT count(*) FROM state_events", tenant=ALPHA))[0][0] == 0
        assert (await h.raw("SELECT count(*) FROM state_threads", tenant=ALPHA))[0][0] == 0
        if tier == "bridge":
            schema = bridge_schema(ALPHA)
            rows = await h.raw(f'SELECT count(*) FROM "{schema}".state_events', tenant=ALPHA)
            assert rows[0][0] == 1
        # A pooled tenant with the same thread id sees its own (empty) world.
        details = await expect_error(grpc.StatusCode.NOT_FOUND, replay(h, "t", BETA))
        assert details["reason"] == "THREAD_NOT_FOUND"
    finally:
        await stop_harness(h)
        await db.close()

"""Durability: a replay after a service restart reproduces exactly the appended events."""

from __future__ import annotations

import grpc
import pytest

from bulkhead.state.v1 import state_pb2
from services.state.server import MIGRATIONS
from shared.db import Database
from tests.services.state.conftest import (
    ALPHA,
    expect_error,
    open_database,
    replay,
    start_harness,
    stop_harness,
)

PAYLOADS = [bytes([i % 256]) * (i + 1) + b"\x00\xff" for i in range(40)]  # binary, varied sizes


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_replay_after_restart_is_identical(request, tmp_path, tokens, master_key, backend: str):
    """Events appended before a restart replay byte for byte, in order, from a fresh process state."""
    db, info = await open_database(request, backend, tmp_path)
    first = await start_harness(db, tokens, backend, master_key=master_key)
    thread = await first.new_thread(thread_id="durable", labels={"k": "v"})
    for start in range(0, len(PAYLOADS), 15):
        await first.append(thread.thread_id, *PAYLOADS[start : start + 15], type=f"batch{start}")
    await first.stub.CreateSnapshot(
        state_pb2.CreateSnapshotRequest(thread_id="durable", version=30, state=b"s30"), metadata=first.md()
    )
    before = [
        (i.event.version, i.event.type, i.event.payload, i.event.create_time.ToMicroseconds())
        for i in await replay(first, thread.thread_id)
    ]
    await stop_harness(first)
    first.envelope.forget()
    await db.close()

    # A new database object, envelope and server: nothing survives but the database and the master key.
    reopened = await Database.open(info["url"], migrations=str(MIGRATIONS), owner_url=info["owner_url"])
    second = await start_harness(reopened, tokens, backend, master_key=master_key)
    try:
        after = [
            (i.event.version, i.event.type, i.event.payload, i.event.create_time.ToMicroseconds())
            for i in await replay(second, thread.thread_id)
        ]
        assert after == before
        assert [p for _, _, p, _ in after] == PAYLOADS
        items = await replay(second, thread.thread_id, from_snapshot=True)
        assert items[0].snapshot.state == b"s30" and [i.event.version for i in items[1:]] == list(range(31, 41))
        got = await second.stub.GetThread(state_pb2.GetThreadRequest(thread_id="durable"), metadata=second.md(ALPHA))
        assert got.thread.version == 40 and dict(got.thread.labels) == {"k": "v"}
        # New appends continue the same log.
        reply = await second.append("durable", b"after-restart", expected=40)
        assert reply.version == 41
    finally:
        await stop_harness(second)
        await reopened.close()


async def test_restart_with_another_master_key_cannot_read(request, tmp_path, tokens, master_key):
    """A service started with a different master key cannot unwrap the stored data key."""
    db, info = await open_database(request, "sqlite", tmp_path)
    first = await start_harness(db, tokens, "sqlite", master_key=master_key)
    await first.new_thread(thread_id="t")
    await first.append("t", b"secret")
    await stop_harness(first)
    await db.close()
    reopened = await Database.open(info["url"])
    second = await start_harness(reopened, tokens, "sqlite", master_key=bytes(32))
    try:
        details = await expect_error(grpc.StatusCode.INTERNAL, replay(second, "t"))
        assert details["reason"] == "UNDECRYPTABLE_DATA"
    finally:
        await stop_harness(second)
        await reopened.close()

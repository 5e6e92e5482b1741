"""Optimistic concurrency under load: 50 writers on one thread, on Postgres (and SQLite)."""

from __future__ import annotations

import asyncio
import itertools
import random

import grpc

from bulkhead.state.v1 import state_pb2
from shared.errors import error_details
from tests.services.state.conftest import ALPHA, StateHarness, replay

WRITERS = 50


async def _read_version(h: StateHarness, thread_id: str) -> int:
    reply = await h.stub.GetThread(state_pb2.GetThreadRequest(thread_id=thread_id), metadata=h.md(ALPHA))
    return reply.thread.version


async def _writer(h: StateHarness, thread_id: str, n: int, md, aborted: list[int]) -> int:
    """Append one event with expected_version, retrying from the reported version after each ABORTED."""
    expected = await _read_version(h, thread_id)
    for attempt in itertools.count(1):
        request = state_pb2.AppendEventsRequest(
            thread_id=thread_id,
            expected_version=expected,
            events=[state_pb2.NewEvent(type="w", payload=f"writer-{n}".encode())],
        )
        try:
            reply = await h.stub.AppendEvents(request, metadata=md)
            return reply.version
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.ABORTED, exc.details()
            aborted.append(n)
            # The loser is told the current version: retry from it without another read.
            current = int(error_details(exc)["metadata"]["current_version"])
            assert current > expected
            expected = current
            # Jittered backoff, as a real client would: fewer doomed attempts, same guarantees.
            await asyncio.sleep(random.uniform(0, 0.004) * min(attempt, 5))
    raise AssertionError("unreachable")


async def _race(h: StateHarness, writers: int = WRITERS) -> None:
    thread = await h.new_thread()
    md = h.md(ALPHA)
    aborted: list[int] = []
    versions = await asyncio.gather(*(_writer(h, thread.thread_id, n, md, aborted) for n in range(writers)))
    # Every writer landed exactly once, each at its own version: dense, 1..50.
    assert sorted(versions) == list(range(1, writers + 1))
    assert aborted, "with concurrent writers some must lose a round"
    events = [i.event for i in await replay(h, thread.thread_id)]
    assert [e.version for e in events] == list(range(1, writers + 1))
    assert sorted(e.payload for e in events) == sorted(f"writer-{n}".encode() for n in range(writers))
    # The version each writer was told is the one its event carries.
    by_payload = {e.payload: e.version for e in events}
    assert all(by_payload[f"writer-{n}".encode()] == versions[n] for n in range(writers))
    assert await _read_version(h, thread.thread_id) == writers


async def test_fifty_writers_on_postgres_get_dense_versions(pg_state: StateHarness):
    """50 concurrent writers with expected_version on Postgres: no lost or duplicated event, losers ABORTED."""
    await _race(pg_state)


async def test_twenty_writers_on_sqlite_get_dense_versions(state: StateHarness):
    """The same race on the embedded SQLite backend (20 writers: it serializes writes anyway)."""
    await _race(state, 20)


async def test_one_round_of_fifty_has_exactly_one_winner(pg_state: StateHarness):
    """50 writers all expecting version 0: one succeeds, 49 get ABORTED naming version 1."""
    h = pg_state
    thread = await h.new_thread()
    md = h.md(ALPHA)

    async def attempt(n: int):
        request = state_pb2.AppendEventsRequest(
            thread_id=thread.thread_id, expected_version=0, events=[state_pb2.NewEvent(type="w", payload=b"%d" % n)]
        )
        return await h.stub.AppendEvents(request, metadata=md)

    results = await asyncio.gather(*(attempt(n) for n in range(WRITERS)), return_exceptions=True)
    wins = [r for r in results if isinstance(r, state_pb2.AppendEventsResponse)]
    losses = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(wins) == 1 and len(losses) == WRITERS - 1
    assert {e.code() for e in losses} == {grpc.StatusCode.ABORTED}
    assert {error_details(e)["metadata"]["current_version"] for e in losses} == {"1"}
    assert [i.event.version for i in await replay(h, thread.thread_id)] == [1]

"""Threads over the wire: create, append, read, replay, list, delete, snapshots; bad input."""

from __future__ import annotations

import grpc

from bulkhead.state.v1 import state_pb2
from tests.services.state.conftest import ALPHA, StateHarness, expect_error, replay


async def test_append_then_read_returns_events_in_order(state: StateHarness):
    """Appended events come back decrypted, with dense versions from 1."""
    thread = await state.new_thread(run_id="r1", agent_id="a1", labels={"team": "blue"})
    assert thread.version == 0 and thread.thread_id.startswith("th_")
    reply = await state.append(thread.thread_id, b"one", b"two", expected=0)
    assert (reply.first_version, reply.version) == (1, 2)
    reply = await state.append(thread.thread_id, b"three")
    assert (reply.first_version, reply.version) == (3, 3)
    page = await state.stub.ReadEvents(state_pb2.ReadEventsRequest(thread_id=thread.thread_id), metadata=state.md())
    assert [(e.version, e.type, e.payload) for e in page.events] == [
        (1, "message", b"one"),
        (2, "message", b"two"),
        (3, "message", b"three"),
    ]
    assert page.next_page_token == "" and page.thread_version == 3
    got = await state.stub.GetThread(state_pb2.GetThreadRequest(thread_id=thread.thread_id), metadata=state.md())
    assert got.thread.version == 3 and dict(got.thread.labels) == {"team": "blue"}
    assert got.thread.run_id == "r1" and got.thread.agent_id == "a1"


async def test_stale_expected_version_is_aborted_with_current_version(state: StateHarness):
    """A writer that lost the race gets ABORTED naming the current version, and nothing is written."""
    thread = await state.new_thread()
    await state.append(thread.thread_id, b"first", expected=0)
    details = await expect_error(grpc.StatusCode.ABORTED, state.append(thread.thread_id, b"late", expected=0))
    assert details["reason"] == "VERSION_CONFLICT"
    assert details["metadata"]["current_version"] == "1"
    rows = await state.raw(
        "SELECT count(*) FROM state_events WHERE thread_id = :t", {"t": thread.thread_id}, tenant=ALPHA
    )
    assert rows[0][0] == 1


async def test_read_events_pages_through_the_whole_thread(state: StateHarness):
    """Paging with next_page_token visits every event once, then ends with an empty token."""
    thread = await state.new_thread()
    await state.append(thread.thread_id, *[f"e{i}".encode() for i in range(1, 16)])
    await state.append(thread.thread_id, *[f"e{i}".encode() for i in range(16, 26)])
    seen, token = [], ""
    while True:
        page = await state.stub.ReadEvents(
            state_pb2.ReadEventsRequest(thread_id=thread.thread_id, page_size=10, page_token=token), metadata=state.md()
        )
        seen += [e.version for e in page.events]
        token = page.next_page_token
        if not token:
            break
    assert seen == list(range(1, 26))


async def test_read_after_version_starts_after_it(state: StateHarness):
    """after_version skips the events up to and including it."""
    thread = await state.new_thread()
    await state.append(thread.thread_id, b"a", b"b", b"c")
    page = await state.stub.ReadEvents(
        state_pb2.ReadEventsRequest(thread_id=thread.thread_id, after_version=2), metadata=state.md()
    )
    assert [e.payload for e in page.events] == [b"c"]


async def test_replay_streams_everything_in_batches_and_stops_at_up_to(state: StateHarness):
    """Replay returns every event in order across several internal batches; up_to_version cuts it."""
    thread = await state.new_thread()
    payloads = [f"p{i}".encode() for i in range(1, 19)]
    await state.append(thread.thread_id, *payloads)
    items = await replay(state, thread.thread_id)
    assert [i.event.payload for i in items] == payloads
    assert [i.event.version for i in items] == list(range(1, 19))
    items = await replay(state, thread.thread_id, up_to_version=8)
    assert [i.event.version for i in items] == list(range(1, 9))


async def test_replay_from_snapshot_starts_with_the_snapshot(state: StateHarness):
    """from_snapshot yields the newest snapshot at or before up_to, then only later events."""
    thread = await state.new_thread()
    await state.append(thread.thread_id, b"1", b"2", b"3", b"4", b"5")
    for v in (2, 4):
        await state.stub.CreateSnapshot(
            state_pb2.CreateSnapshotRequest(thread_id=thread.thread_id, version=v, state=f"state@{v}".encode()),
            metadata=state.md(),
        )
    items = await replay(state, thread.thread_id, from_snapshot=True)
    assert items[0].WhichOneof("item") == "snapshot" and items[0].snapshot.state == b"state@4"
    assert [i.event.version for i in items[1:]] == [5]
    items = await replay(state, thread.thread_id, from_snapshot=True, up_to_version=3)
    assert items[0].snapshot.version == 2 and [i.event.version for i in items[1:]] == [3]


async def test_get_snapshot_picks_newest_at_or_before(state: StateHarness):
    """GetSnapshot returns the newest snapshot not after the asked version; none → NOT_FOUND."""
    thread = await state.new_thread()
    await state.append(thread.thread_id, b"1", b"2", b"3")
    details = await expect_error(
        grpc.StatusCode.NOT_FOUND,
        state.stub.GetSnapshot(state_pb2.GetSnapshotRequest(thread_id=thread.thread_id), metadata=state.md()),
    )
    assert details["reason"] == "SNAPSHOT_NOT_FOUND"
    await state.stub.CreateSnapshot(
        state_pb2.CreateSnapshotRequest(thread_id=thread.thread_id, version=2, state=b"s2"), metadata=state.md()
    )
    got = await state.stub.GetSnapshot(
        state_pb2.GetSnapshotRequest(thread_id=thread.thread_id, at_or_before_version=3), metadata=state.md()
    )
    assert (got.snapshot.version, got.snapshot.state) == (2, b"s2")
    details = await expect_error(
        grpc.StatusCode.NOT_FOUND,
        state.stub.GetSnapshot(
            state_pb2.GetSnapshotRequest(thread_id=thread.thread_id, at_or_before_version=1), metadata=state.md()
        ),
    )
    assert details["reason"] == "SNAPSHOT_NOT_FOUND"
    details = await expect_error(
        grpc.StatusCode.ALREADY_EXISTS,
        state.stub.CreateSnapshot(
            state_pb2.CreateSnapshotRequest(thread_id=thread.thread_id, version=2, state=b"again"), metadata=state.md()
        ),
    )
    assert details["reason"] == "SNAPSHOT_EXISTS"


async def test_snapshot_beyond_thread_version_is_refused(state: StateHarness):
    """A snapshot must reflect a version the thread has reached; version 0 is refused."""
    thread = await state.new_thread()
    await state.append(thread.thread_id, b"1")
    details = await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        state.stub.CreateSnapshot(
            state_pb2.CreateSnapshotRequest(thread_id=thread.thread_id, version=2, state=b"x"), metadata=state.md()
        ),
    )
    assert details["reason"] == "VERSION_OUT_OF_RANGE"
    details = await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        state.stub.CreateSnapshot(
            state_pb2.CreateSnapshotRequest(thread_id=thread.thread_id, version=0, state=b"x"), metadata=state.md()
        ),
    )
    assert details["reason"] == "INVALID_VERSION"
    assert (await state.raw("SELECT count(*) FROM state_snapshots"))[0][0] == 0


async def test_list_threads_filters_and_pages(state: StateHarness):
    """ListThreads filters by run, agent and labels and pages in thread_id order."""
    for i in range(12):
        await state.new_thread(
            thread_id=f"t{i:02d}",
            run_id="r1" if i % 2 else "r2",
            agent_id=f"a{i % 3}",
            labels={"team": "blue" if i < 6 else "red", "n": str(i)},
        )
    ids, token = [], ""
    while True:
        page = await state.stub.ListThreads(
            state_pb2.ListThreadsRequest(page_size=5, page_token=token), metadata=state.md()
        )
        ids += [t.thread_id for t in page.threads]
        token = page.next_page_token
        if not token:
            break
    assert ids == [f"t{i:02d}" for i in range(12)]
    page = await state.stub.ListThreads(
        state_pb2.ListThreadsRequest(run_id="r1", labels={"team": "blue"}), metadata=state.md()
    )
    assert [t.thread_id for t in page.threads] == ["t01", "t03", "t05"]
    page = await state.stub.ListThreads(
        state_pb2.ListThreadsRequest(agent_id="a0", labels={"team": "red"}), metadata=state.md()
    )
    assert [t.thread_id for t in page.threads] == ["t06", "t09"]


async def test_list_token_from_other_filters_is_refused(state: StateHarness):
    """A page token only continues the query that produced it."""
    for i in range(3):
        await state.new_thread(thread_id=f"t{i}", run_id="r1")
    page = await state.stub.ListThreads(state_pb2.ListThreadsRequest(page_size=1, run_id="r1"), metadata=state.md())
    assert page.next_page_token
    details = await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        state.stub.ListThreads(
            state_pb2.ListThreadsRequest(page_size=1, run_id="r2", page_token=page.next_page_token), metadata=state.md()
        ),
    )
    assert details["reason"] == "INVALID_PAGE_TOKEN"


async def test_delete_thread_removes_events_and_snapshots(state: StateHarness):
    """DeleteThread removes the thread, its events, labels and snapshots; it is then NOT_FOUND."""
    thread = await state.new_thread(labels={"k": "v"})
    await state.append(thread.thread_id, b"1", b"2")
    await state.stub.CreateSnapshot(
        state_pb2.CreateSnapshotRequest(thread_id=thread.thread_id, version=1, state=b"s"), metadata=state.md()
    )
    details = await expect_error(
        grpc.StatusCode.ABORTED,
        state.stub.DeleteThread(
            state_pb2.DeleteThreadRequest(thread_id=thread.thread_id, expected_version=1), metadata=state.md()
        ),
    )
    assert details["metadata"]["current_version"] == "2"
    await state.stub.DeleteThread(
        state_pb2.DeleteThreadRequest(thread_id=thread.thread_id, expected_version=2), metadata=state.md()
    )
    for table in ("state_threads", "state_events", "state_snapshots", "state_thread_labels"):
        assert (await state.raw(f"SELECT count(*) FROM {table}"))[0][0] == 0, table
    details = await expect_error(
        grpc.StatusCode.NOT_FOUND,
        state.stub.GetThread(state_pb2.GetThreadRequest(thread_id=thread.thread_id), metadata=state.md()),
    )
    assert details["reason"] == "THREAD_NOT_FOUND"


async def test_create_with_existing_id_is_already_exists(state: StateHarness):
    """Thread ids are unique within a tenant."""
    await state.new_thread(thread_id="dup")
    details = await expect_error(grpc.StatusCode.ALREADY_EXISTS, state.new_thread(thread_id="dup"))
    assert details["reason"] == "THREAD_EXISTS"


async def test_every_change_writes_one_audit_entry(state: StateHarness):
    """Create, append, snapshot and delete each leave an audit row with principal and version; failures none."""
    thread = await state.new_thread()
    await state.append(thread.thread_id, b"1", b"2")
    await expect_error(grpc.StatusCode.ABORTED, state.append(thread.thread_id, b"x", expected=0))
    await state.stub.CreateSnapshot(
        state_pb2.CreateSnapshotRequest(thread_id=thread.thread_id, version=2, state=b"s"), metadata=state.md()
    )
    await state.stub.DeleteThread(state_pb2.DeleteThreadRequest(thread_id=thread.thread_id), metadata=state.md())
    rows = await state.raw(
        "SELECT action, target, version, principal_id, tenant_id FROM state_audit "
        "WHERE action != 'datakey.create' ORDER BY id"
    )
    assert [tuple(r) for r in rows] == [
        ("thread.create", thread.thread_id, 0, "p_test", ALPHA),
        ("thread.append", thread.thread_id, 2, "p_test", ALPHA),
        ("snapshot.create", thread.thread_id, 2, "p_test", ALPHA),
        ("thread.delete", thread.thread_id, 2, "p_test", ALPHA),
    ]

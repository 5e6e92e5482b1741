"""Bad input gets a precise status and ErrorInfo reason, and writes nothing."""

from __future__ import annotations

import base64
import json

import grpc
import pytest

from bulkhead.state.v1 import state_pb2
from tests.services.state.conftest import (
    ALPHA,
    TEST_LIMITS,
    StateHarness,
    expect_error,
    replay,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def _counts(h: StateHarness) -> tuple:
    """Rows in every table, to prove a failed call changed nothing.

    The tenant's data key (and its audit row) may be created by a first write attempt that then
    fails: that is key setup, not data, so it is left out.
    """
    tables = ("state_threads", "state_events", "state_snapshots", "state_context", "state_thread_labels")
    counts = [(await h.raw(f"SELECT count(*) FROM {t}"))[0][0] for t in tables]
    audit = await h.raw("SELECT count(*) FROM state_audit WHERE action != 'datakey.create'")
    return (*counts, audit[0][0])


async def test_oversized_event_names_the_limit_and_writes_nothing(state: StateHarness):
    """An event over max_event_bytes → INVALID_ARGUMENT EVENT_TOO_LARGE naming the limit; nothing written."""
    thread = await state.new_thread()
    await state.append(thread.thread_id, b"ok")
    before = await _counts(state)
    big = b"x" * (TEST_LIMITS.max_event_bytes + 1)
    details = await expect_error(INVALID, state.append(thread.thread_id, b"fine", big))
    assert details["reason"] == "EVENT_TOO_LARGE"
    assert details["metadata"] == {"limit": "max_event_bytes", "max": str(TEST_LIMITS.max_event_bytes)}
    assert "events[1].payload" in details["bad_request"]
    assert await _counts(state) == before
    got = await state.stub.GetThread(state_pb2.GetThreadRequest(thread_id=thread.thread_id), metadata=state.md())
    assert got.thread.version == 1


async def test_event_at_the_size_limit_is_accepted(state: StateHarness):
    """Exactly max_event_bytes is allowed (the limit is inclusive)."""
    thread = await state.new_thread()
    reply = await state.append(thread.thread_id, b"x" * TEST_LIMITS.max_event_bytes)
    assert reply.version == 1


async def test_too_many_events_names_the_limit(state: StateHarness):
    """More than max_events_per_append → TOO_MANY_EVENTS; nothing written."""
    thread = await state.new_thread()
    before = await _counts(state)
    details = await expect_error(
        INVALID, state.append(thread.thread_id, *[b"e"] * (TEST_LIMITS.max_events_per_append + 1))
    )
    assert details["reason"] == "TOO_MANY_EVENTS"
    assert details["metadata"]["limit"] == "max_events_per_append"
    assert await _counts(state) == before


async def test_empty_append_and_bad_type_are_refused(state: StateHarness):
    """An append needs at least one event, each with a well-formed type."""
    thread = await state.new_thread()
    details = await expect_error(INVALID, state.append(thread.thread_id))
    assert details["reason"] == "NO_EVENTS"
    details = await expect_error(INVALID, state.append(thread.thread_id, b"x", type=""))
    assert details["reason"] == "INVALID_EVENT_TYPE"


async def test_unknown_thread_is_not_found_for_every_thread_rpc(state: StateHarness):
    """Every RPC on a thread that does not exist → NOT_FOUND THREAD_NOT_FOUND; nothing written."""
    before = await _counts(state)
    md = state.md()
    calls = [
        state.append("nope", b"x"),
        state.append("nope", b"x", expected=0),
        state.stub.GetThread(state_pb2.GetThreadRequest(thread_id="nope"), metadata=md),
        state.stub.ReadEvents(state_pb2.ReadEventsRequest(thread_id="nope"), metadata=md),
        state.stub.DeleteThread(state_pb2.DeleteThreadRequest(thread_id="nope"), metadata=md),
        state.stub.CreateSnapshot(
            state_pb2.CreateSnapshotRequest(thread_id="nope", version=1, state=b"s"), metadata=md
        ),
        state.stub.GetSnapshot(state_pb2.GetSnapshotRequest(thread_id="nope"), metadata=md),
        replay(state, "nope"),
    ]
    for call in calls:
        details = await expect_error(grpc.StatusCode.NOT_FOUND, call)
        assert details["reason"] == "THREAD_NOT_FOUND"
    assert await _counts(state) == before


@pytest.mark.parametrize(
    "field",
    [
        "expected_version",
        "after_version",
        "up_to_version",
        "at_or_before_version",
        "snapshot_version",
        "delete_expected_version",
    ],
)
async def test_negative_versions_are_invalid(state: StateHarness, field: str):
    """A negative version anywhere → INVALID_ARGUMENT INVALID_VERSION naming the field; nothing written."""
    thread = await state.new_thread()
    await state.append(thread.thread_id, b"1")
    before = await _counts(state)
    md, tid = state.md(), thread.thread_id
    call = {
        "expected_version": lambda: state.append(tid, b"x", expected=-1),
        "after_version": lambda: state.stub.ReadEvents(
            state_pb2.ReadEventsRequest(thread_id=tid, after_version=-1), metadata=md
        ),
        "up_to_version": lambda: replay(state, tid, up_to_version=-1),
        "at_or_before_version": lambda: state.stub.GetSnapshot(
            state_pb2.GetSnapshotRequest(thread_id=tid, at_or_before_version=-1), metadata=md
        ),
        "snapshot_version": lambda: state.stub.CreateSnapshot(
            state_pb2.CreateSnapshotRequest(thread_id=tid, version=-1, state=b"s"), metadata=md
        ),
        "delete_expected_version": lambda: state.stub.DeleteThread(
            state_pb2.DeleteThreadRequest(thread_id=tid, expected_version=-1), metadata=md
        ),
    }[field]()
    details = await expect_error(INVALID, call)
    assert details["reason"] == "INVALID_VERSION"
    assert list(details["bad_request"]) == [field.removeprefix("snapshot_").removeprefix("delete_")]
    assert await _counts(state) == before


async def test_replay_beyond_the_thread_version_is_out_of_range(state: StateHarness):
    """up_to_version past the end → INVALID_ARGUMENT VERSION_OUT_OF_RANGE with the current version."""
    thread = await state.new_thread()
    await state.append(thread.thread_id, b"1")
    details = await expect_error(INVALID, replay(state, thread.thread_id, up_to_version=5))
    assert details["reason"] == "VERSION_OUT_OF_RANGE" and details["metadata"]["current_version"] == "1"


def _token(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        "%%%",
        "bm90IGpzb24",
        _token([1, 2]),
        _token({"q": "x"}),
        _token({"q": "x", "a": "3"}),
        _token({"q": "x", "a": -1}),
        _token({"q": "x", "a": True}),
    ],
)
async def test_malformed_page_tokens_are_invalid(state: StateHarness, token: str):
    """Garbage, wrong-shaped or forged page tokens → INVALID_ARGUMENT INVALID_PAGE_TOKEN on both paged RPCs."""
    thread = await state.new_thread()
    await state.append(thread.thread_id, b"1")
    for call in (
        state.stub.ReadEvents(
            state_pb2.ReadEventsRequest(thread_id=thread.thread_id, page_token=token), metadata=state.md()
        ),
        state.stub.ListThreads(state_pb2.ListThreadsRequest(page_token=token), metadata=state.md()),
    ):
        details = await expect_error(INVALID, call)
        assert details["reason"] == "INVALID_PAGE_TOKEN"
        assert "page_token" in details["bad_request"]


async def test_page_token_of_another_thread_is_refused(state: StateHarness):
    """A ReadEvents token continues only the thread it came from."""
    first, second = await state.new_thread(), await state.new_thread()
    await state.append(first.thread_id, *[b"e"] * 12)
    page = await state.stub.ReadEvents(
        state_pb2.ReadEventsRequest(thread_id=first.thread_id, page_size=5), metadata=state.md()
    )
    details = await expect_error(
        INVALID,
        state.stub.ReadEvents(
            state_pb2.ReadEventsRequest(thread_id=second.thread_id, page_token=page.next_page_token),
            metadata=state.md(),
        ),
    )
    assert details["reason"] == "INVALID_PAGE_TOKEN"


async def test_negative_page_size_is_invalid(state: StateHarness):
    """page_size < 0 → INVALID_PAGE_SIZE."""
    details = await expect_error(
        INVALID, state.stub.ListThreads(state_pb2.ListThreadsRequest(page_size=-1), metadata=state.md())
    )
    assert details["reason"] == "INVALID_PAGE_SIZE"


@pytest.mark.parametrize("thread_id", ["UPPER", "has space", "x" * 65, "semi;colon"])
async def test_malformed_thread_ids_are_invalid(state: StateHarness, thread_id: str):
    """Thread ids outside [a-z0-9_-]{1,64} → INVALID_THREAD_ID, on create and on use."""
    details = await expect_error(INVALID, state.new_thread(thread_id=thread_id))
    assert details["reason"] == "INVALID_THREAD_ID"
    details = await expect_error(INVALID, state.append(thread_id, b"x"))
    assert details["reason"] == "INVALID_THREAD_ID"
    assert (await state.raw("SELECT count(*) FROM state_threads"))[0][0] == 0


async def test_oversized_snapshot_names_the_limit(state: StateHarness):
    """A snapshot over max_snapshot_bytes → SNAPSHOT_TOO_LARGE; nothing written."""
    thread = await state.new_thread()
    await state.append(thread.thread_id, b"1")
    details = await expect_error(
        INVALID,
        state.stub.CreateSnapshot(
            state_pb2.CreateSnapshotRequest(
                thread_id=thread.thread_id, version=1, state=b"s" * (TEST_LIMITS.max_snapshot_bytes + 1)
            ),
            metadata=state.md(),
        ),
    )
    assert details["reason"] == "SNAPSHOT_TOO_LARGE" and details["metadata"]["limit"] == "max_snapshot_bytes"
    assert (await state.raw("SELECT count(*) FROM state_snapshots"))[0][0] == 0


async def test_too_many_labels_and_bad_label_keys(state: StateHarness):
    """Labels are bounded in number and shape."""
    labels = {f"k{i}": "v" for i in range(TEST_LIMITS.max_labels + 1)}
    details = await expect_error(INVALID, state.new_thread(labels=labels))
    assert details["reason"] == "TOO_MANY_LABELS"
    details = await expect_error(INVALID, state.new_thread(labels={"Bad Key": "v"}))
    assert details["reason"] == "INVALID_LABEL"


async def test_scope_is_enforced_per_method(state: StateHarness):
    """A read-only token cannot append, delete or write context (PERMISSION_DENIED MISSING_SCOPE)."""
    thread = await state.new_thread()
    md = state.md(ALPHA, scopes=("state.threads.read",))
    details = await expect_error(
        grpc.StatusCode.PERMISSION_DENIED,
        state.stub.AppendEvents(
            state_pb2.AppendEventsRequest(thread_id=thread.thread_id, events=[state_pb2.NewEvent(type="m")]),
            metadata=md,
        ),
    )
    assert details["reason"] == "MISSING_SCOPE"
    await expect_error(
        grpc.StatusCode.PERMISSION_DENIED,
        state.stub.DeleteThread(state_pb2.DeleteThreadRequest(thread_id=thread.thread_id), metadata=md),
    )
    await state.stub.GetThread(state_pb2.GetThreadRequest(thread_id=thread.thread_id), metadata=md)

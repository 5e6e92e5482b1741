"""Tenant isolation: every RPC with tenant B's token on tenant A's resources is denied without a leak.

Runs on SQLite (ORM criteria) and on Postgres (ORM criteria + row-level security, runtime role).
"""

from __future__ import annotations

import grpc
from google.protobuf import duration_pb2

from bulkhead.state.v1 import state_pb2
from tests.services.state.conftest import (
    ALPHA,
    BETA,
    StateHarness,
    expect_error,
    replay,
)

NOT_FOUND = grpc.StatusCode.NOT_FOUND
TEAM = state_pb2.ContextScope(kind=state_pb2.SCOPE_KIND_TEAM, id="shared-team-name")


async def _alpha_world(h: StateHarness) -> str:
    """Tenant A's thread (3 events, a snapshot) and context key; returns the thread id."""
    thread = await h.new_thread(ALPHA, thread_id="common-name", run_id="run-a", labels={"team": "x"})
    await h.append(thread.thread_id, b"alpha-1", b"alpha-2", b"alpha-3", tenant=ALPHA)
    await h.stub.CreateSnapshot(
        state_pb2.CreateSnapshotRequest(thread_id=thread.thread_id, version=2, state=b"alpha-state"),
        metadata=h.md(ALPHA),
    )
    await h.stub.PutContext(
        state_pb2.PutContextRequest(scope=TEAM, key="plan", value=b"alpha-plan"), metadata=h.md(ALPHA)
    )
    return thread.thread_id


async def _alpha_unchanged(h: StateHarness, thread_id: str) -> None:
    items = await replay(h, thread_id, ALPHA)
    assert [i.event.payload for i in items] == [b"alpha-1", b"alpha-2", b"alpha-3"]
    got = await h.stub.GetContext(state_pb2.GetContextRequest(scope=TEAM, key="plan"), metadata=h.md(ALPHA))
    assert (got.entry.value, got.entry.revision) == (b"alpha-plan", 1)
    snap = await h.stub.GetSnapshot(state_pb2.GetSnapshotRequest(thread_id=thread_id), metadata=h.md(ALPHA))
    assert snap.snapshot.state == b"alpha-state"


async def test_thread_rpcs_of_another_tenant_are_not_found(any_state: StateHarness):
    """B's token on A's thread: every thread RPC (Replay stream included) → NOT_FOUND, A untouched."""
    h = any_state
    tid = await _alpha_world(h)
    md = h.md(BETA)
    calls = [
        h.stub.GetThread(state_pb2.GetThreadRequest(thread_id=tid), metadata=md),
        h.stub.ReadEvents(state_pb2.ReadEventsRequest(thread_id=tid), metadata=md),
        h.append(tid, b"beta-was-here", tenant=BETA),
        h.append(tid, b"beta-was-here", tenant=BETA, expected=3),
        replay(h, tid, BETA),
        replay(h, tid, BETA, from_snapshot=True),
        h.stub.CreateSnapshot(state_pb2.CreateSnapshotRequest(thread_id=tid, version=1, state=b"b"), metadata=md),
        h.stub.GetSnapshot(state_pb2.GetSnapshotRequest(thread_id=tid), metadata=md),
        h.stub.DeleteThread(state_pb2.DeleteThreadRequest(thread_id=tid), metadata=md),
    ]
    for call in calls:
        details = await expect_error(NOT_FOUND, call)
        # The same answer as for a thread that never existed: no existence leak.
        assert details["reason"] == "THREAD_NOT_FOUND"
        assert "alpha" not in str(details)
    await _alpha_unchanged(h, tid)


async def test_list_threads_shows_only_own_threads(any_state: StateHarness):
    """ListThreads with B's token sees none of A's threads, whatever the filters."""
    h = any_state
    await _alpha_world(h)
    await h.new_thread(BETA, thread_id="beta-own", run_id="run-a", labels={"team": "x"})
    for request in (
        state_pb2.ListThreadsRequest(),
        state_pb2.ListThreadsRequest(run_id="run-a"),
        state_pb2.ListThreadsRequest(labels={"team": "x"}),
    ):
        page = await h.stub.ListThreads(request, metadata=h.md(BETA))
        assert [t.thread_id for t in page.threads] == ["beta-own"]


async def test_same_thread_id_in_two_tenants_are_separate_logs(any_state: StateHarness):
    """B may create a thread with A's id; the two logs never mix."""
    h = any_state
    tid = await _alpha_world(h)
    await h.new_thread(BETA, thread_id=tid)
    reply = await h.append(tid, b"beta-1", tenant=BETA, expected=0)
    assert reply.version == 1
    assert [i.event.payload for i in await replay(h, tid, BETA)] == [b"beta-1"]
    await _alpha_unchanged(h, tid)


async def test_page_token_of_another_tenant_reveals_nothing(any_state: StateHarness):
    """A's page token used by B is refused (INVALID_PAGE_TOKEN), though B has a thread of that name: a token
    is bound to the tenant it was issued to."""
    h = any_state
    tid = await _alpha_world(h)
    await h.new_thread(BETA, thread_id=tid)
    await h.append(tid, b"beta-1", tenant=BETA)
    page = await h.stub.ReadEvents(state_pb2.ReadEventsRequest(thread_id=tid, page_size=1), metadata=h.md(ALPHA))
    details = await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        h.stub.ReadEvents(
            state_pb2.ReadEventsRequest(thread_id=tid, page_token=page.next_page_token), metadata=h.md(BETA)
        ),
    )
    assert details["reason"] == "INVALID_PAGE_TOKEN" and "alpha" not in str(details)


async def test_context_of_another_tenant_is_invisible_and_cas_cannot_touch_it(any_state: StateHarness):
    """B's Get/Delete on A's key → NOT_FOUND; B's CAS against A's revision fails; B's put is B's own."""
    h = any_state
    tid = await _alpha_world(h)
    md = h.md(BETA)
    details = await expect_error(
        NOT_FOUND, h.stub.GetContext(state_pb2.GetContextRequest(scope=TEAM, key="plan"), metadata=md)
    )
    assert details["reason"] == "CONTEXT_NOT_FOUND"
    await expect_error(
        NOT_FOUND, h.stub.DeleteContext(state_pb2.DeleteContextRequest(scope=TEAM, key="plan"), metadata=md)
    )
    await expect_error(
        NOT_FOUND,
        h.stub.DeleteContext(state_pb2.DeleteContextRequest(scope=TEAM, key="plan", expected_revision=1), metadata=md),
    )
    # CAS with A's revision: for B the key does not exist (revision 0), so the swap is refused
    # and the reported current revision is B's own (0), not A's.
    details = await expect_error(
        grpc.StatusCode.ABORTED,
        h.stub.PutContext(
            state_pb2.PutContextRequest(scope=TEAM, key="plan", value=b"beta", expected_revision=1), metadata=md
        ),
    )
    assert details["metadata"]["current_revision"] == "0"
    created = await h.stub.PutContext(
        state_pb2.PutContextRequest(
            scope=TEAM, key="plan", value=b"beta-plan", expected_revision=0, ttl=duration_pb2.Duration(seconds=60)
        ),
        metadata=md,
    )
    assert created.entry.revision == 1
    await _alpha_unchanged(h, tid)


async def test_wrong_tenant_header_or_no_token_is_refused(any_state: StateHarness):
    """x-tenant-id must match the token (PERMISSION_DENIED); no token → UNAUTHENTICATED."""
    h = any_state
    tid = await _alpha_world(h)
    token_md = dict(h.md(BETA))
    spoofed = (("authorization", token_md["authorization"]), ("x-tenant-id", ALPHA))
    details = await expect_error(
        grpc.StatusCode.PERMISSION_DENIED, h.stub.GetThread(state_pb2.GetThreadRequest(thread_id=tid), metadata=spoofed)
    )
    assert details["reason"] == "TENANT_MISMATCH"
    await expect_error(grpc.StatusCode.UNAUTHENTICATED, h.stub.GetThread(state_pb2.GetThreadRequest(thread_id=tid)))
    stream = h.stub.Replay(state_pb2.ReplayRequest(thread_id=tid), metadata=spoofed)
    await expect_error(grpc.StatusCode.PERMISSION_DENIED, _drain(stream))


async def _drain(stream) -> list:
    return [item async for item in stream]

"""Shared context over the wire: put/get/delete, compare-and-set, TTL, limits."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import duration_pb2

from bulkhead.state.v1 import state_pb2
from tests.services.state.conftest import ALPHA, TEST_LIMITS, StateHarness, expect_error

TEAM = state_pb2.ContextScope(kind=state_pb2.SCOPE_KIND_TEAM, id="team-1")
RUN = state_pb2.ContextScope(kind=state_pb2.SCOPE_KIND_RUN, id="run-1")


def put(
    h: StateHarness,
    key: str,
    value: bytes,
    *,
    scope=TEAM,
    expected: int | None = None,
    ttl: duration_pb2.Duration | None = None,
    tenant: str = ALPHA,
):
    request = state_pb2.PutContextRequest(scope=scope, key=key, value=value, ttl=ttl)
    if expected is not None:
        request.expected_revision = expected
    return h.stub.PutContext(request, metadata=h.md(tenant))


def get(h: StateHarness, key: str, *, scope=TEAM, tenant: str = ALPHA):
    return h.stub.GetContext(state_pb2.GetContextRequest(scope=scope, key=key), metadata=h.md(tenant))


def delete(h: StateHarness, key: str, *, scope=TEAM, expected: int | None = None, tenant: str = ALPHA):
    request = state_pb2.DeleteContextRequest(scope=scope, key=key)
    if expected is not None:
        request.expected_revision = expected
    return h.stub.DeleteContext(request, metadata=h.md(tenant))


async def test_put_then_get_round_trips_and_counts_revisions(state: StateHarness):
    """Each write bumps the revision; Get returns the latest value decrypted."""
    first = await put(state, "plan", b"v1")
    second = await put(state, "plan", b"v2")
    assert (first.entry.revision, second.entry.revision) == (1, 2)
    got = await get(state, "plan")
    assert (got.entry.value, got.entry.revision) == (b"v2", 2)
    assert not got.entry.HasField("expire_time")


async def test_scopes_are_separate_spaces(state: StateHarness):
    """The same key in a team scope and a run scope are different values."""
    await put(state, "k", b"team", scope=TEAM)
    await put(state, "k", b"run", scope=RUN)
    assert (await get(state, "k", scope=TEAM)).entry.value == b"team"
    assert (await get(state, "k", scope=RUN)).entry.value == b"run"


async def test_compare_and_set_create_only_and_conflicts(state: StateHarness):
    """expected_revision 0 creates only; a stale revision → ABORTED REVISION_CONFLICT with the current one."""
    created = await put(state, "lock", b"a", expected=0)
    assert created.entry.revision == 1
    details = await expect_error(grpc.StatusCode.ABORTED, put(state, "lock", b"b", expected=0))
    assert details["reason"] == "REVISION_CONFLICT" and details["metadata"]["current_revision"] == "1"
    updated = await put(state, "lock", b"c", expected=1)
    assert updated.entry.revision == 2
    details = await expect_error(grpc.StatusCode.ABORTED, put(state, "lock", b"d", expected=1))
    assert details["metadata"]["current_revision"] == "2"
    assert (await get(state, "lock")).entry.value == b"c"


async def test_concurrent_compare_and_set_has_one_winner(state: StateHarness):
    """Ten writers CAS from the same revision: exactly one wins, the rest are ABORTED."""
    await put(state, "counter", b"0")
    results = await asyncio.gather(
        *(put(state, "counter", str(i).encode(), expected=1) for i in range(10)), return_exceptions=True
    )
    winners = [r for r in results if not isinstance(r, Exception)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1 and len(losers) == 9
    assert all(e.code() == grpc.StatusCode.ABORTED for e in losers)
    assert (await get(state, "counter")).entry.value == winners[0].entry.value


async def test_delete_leaves_revision_history_so_old_revisions_never_match(state: StateHarness):
    """After delete the key is NOT_FOUND; re-creating continues the revision count (no ABA)."""
    await put(state, "k", b"v")
    details = await expect_error(grpc.StatusCode.ABORTED, delete(state, "k", expected=5))
    assert details["metadata"]["current_revision"] == "1"
    await delete(state, "k", expected=1)
    details = await expect_error(grpc.StatusCode.NOT_FOUND, get(state, "k"))
    assert details["reason"] == "CONTEXT_NOT_FOUND"
    await expect_error(grpc.StatusCode.NOT_FOUND, delete(state, "k"))
    await expect_error(grpc.StatusCode.ABORTED, put(state, "k", b"again", expected=1))
    again = await put(state, "k", b"again", expected=0)
    assert again.entry.revision == 3


async def test_expired_value_is_not_found_and_counts_as_absent(state: StateHarness):
    """A value past its TTL reads as NOT_FOUND and can be re-created with expected_revision 0."""
    await put(state, "short", b"v", ttl=duration_pb2.Duration(nanos=1000))
    await asyncio.sleep(0.01)
    details = await expect_error(grpc.StatusCode.NOT_FOUND, get(state, "short"))
    assert details["reason"] == "CONTEXT_NOT_FOUND"
    again = await put(state, "short", b"w", expected=0)
    assert again.entry.revision == 2


async def test_ttl_sets_expire_time(state: StateHarness):
    """A TTL shows as expire_time = update_time + ttl."""
    reply = await put(state, "k", b"v", ttl=duration_pb2.Duration(seconds=60))
    entry = reply.entry
    assert entry.expire_time.ToMicroseconds() - entry.update_time.ToMicroseconds() == 60_000_000
    assert (await get(state, "k")).entry.expire_time == entry.expire_time


@pytest.mark.parametrize(
    "case,reason",
    [
        ("no_scope_kind", "INVALID_SCOPE"),
        ("no_scope_id", "INVALID_SCOPE"),
        ("bad_key", "INVALID_KEY"),
        ("big_value", "VALUE_TOO_LARGE"),
        ("negative_revision", "INVALID_REVISION"),
        ("zero_ttl", "INVALID_TTL"),
        ("negative_ttl", "INVALID_TTL"),
        ("endless_ttl", "INVALID_TTL"),
    ],
)
async def test_bad_context_input_is_invalid_and_writes_nothing(state: StateHarness, case: str, reason: str):
    """Each malformed PutContext → INVALID_ARGUMENT with its reason; no row written."""
    kwargs = {
        "no_scope_kind": {"scope": state_pb2.ContextScope(id="x")},
        "no_scope_id": {"scope": state_pb2.ContextScope(kind=state_pb2.SCOPE_KIND_RUN)},
        "bad_key": {"key": "white space"},
        "big_value": {"value": b"v" * (TEST_LIMITS.max_value_bytes + 1)},
        "negative_revision": {"expected": -1},
        "zero_ttl": {"ttl": duration_pb2.Duration()},
        "negative_ttl": {"ttl": duration_pb2.Duration(seconds=-5)},
        "endless_ttl": {"ttl": duration_pb2.Duration(seconds=2**53 - 1)},  # its expiry overflows 64 bits
    }[case]
    args = {"key": "k", "value": b"v", **kwargs}
    details = await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, put(state, args.pop("key"), args.pop("value"), **args)
    )
    assert details["reason"] == reason
    assert (await state.raw("SELECT count(*) FROM state_context"))[0][0] == 0


async def test_context_changes_are_audited(state: StateHarness):
    """Put and delete each write an audit row naming scope, key and revision."""
    await put(state, "k", b"v")
    await delete(state, "k")
    rows = await state.raw("SELECT action, target, version FROM state_audit WHERE action LIKE 'context.%' ORDER BY id")
    assert [tuple(r) for r in rows] == [("context.put", "team/team-1/k", 1), ("context.delete", "team/team-1/k", 2)]

"""bulkhead.client's helpers for callers: pages (every page of a paging RPC, each asked for with the token the
last one gave) and describe_error (one line and a hint that fits the refusal)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from bulkhead.client import describe_error, pages
from shared.errors import PermissionDenied, trailing_metadata


@dataclass
class _Page:
    items: list[int]
    next_page_token: str


async def test_pages_follow_the_tokens_to_the_last_page():
    served = {"": _Page([1, 2], "t1"), "t1": _Page([3], "t2"), "t2": _Page([], "")}
    asked: list[str] = []

    async def fetch(token: str) -> _Page:
        asked.append(token)
        return served[token]

    got = [item async for page in pages(fetch) for item in page.items]
    assert got == [1, 2, 3] and asked == ["", "t1", "t2"]


async def test_one_page_is_one_call():
    calls = 0

    async def fetch(token: str) -> _Page:
        nonlocal calls
        calls += 1
        return _Page([7], "")

    assert [p.items async for p in pages(fetch)] == [[7]] and calls == 1


def _refused(error) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        error.code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing_metadata(error)), error.message
    )


def test_a_missing_scope_says_how_to_get_one_and_other_refusals_keep_their_own_advice():
    """describe_error's hint fits the reason: only a missing scope is about the key (a suspended tenant is not)."""
    scope = describe_error(_refused(PermissionDenied("token lacks the scope 'x'", reason="MISSING_SCOPE")))
    assert "bulkhead keys create --scope" in scope
    suspended = describe_error(
        _refused(PermissionDenied("tenant is suspended: contact the platform operator", reason="TENANT_SUSPENDED"))
    )
    assert suspended.endswith("[TENANT_SUSPENDED]") and "scope" not in suspended

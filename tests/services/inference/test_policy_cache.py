"""The proxy's per-tenant policy cache: a change (forget) wins over a load already in flight."""

from __future__ import annotations

import asyncio

from shared.cache import TenantCache


async def test_a_load_begun_before_forget_is_neither_joined_nor_kept():
    """A run's policy load in flight while the tenant registers a private model must not hide it
    for the cache's TTL (seen as 'model ... is not allowed' right after RegisterPrivateModel)."""
    cache = TenantCache(60.0)
    release = asyncio.Event()
    version = {"v": "before"}

    async def load():
        seen = version["v"]
        await release.wait()
        return seen

    stale = asyncio.create_task(cache.load("t_a", load))
    await asyncio.sleep(0)  # the load has read "before" and waits
    version["v"] = "after"
    cache.invalidate("t_a")  # the change committed: RegisterPrivateModel forgets the tenant's policy
    fresh = asyncio.create_task(cache.load("t_a", load))
    await asyncio.sleep(0)
    release.set()
    assert await stale == "before"  # its caller began before the change
    assert await fresh == "after"  # a caller after the change never joins the stale load
    assert await cache.load("t_a", load) == "after"  # and the stale value was not stored over it


async def test_concurrent_misses_share_one_load():
    cache = TenantCache(60.0)
    calls = []

    async def load():
        calls.append(1)
        await asyncio.sleep(0.01)
        return "p"

    assert await asyncio.gather(*(cache.load("t_a", load) for _ in range(5))) == ["p"] * 5
    assert len(calls) == 1

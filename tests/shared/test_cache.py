"""The one per-tenant TTL cache: bound and LRU, TTL, single-flight, failures, stale-on-error, tenant keying."""

from __future__ import annotations

import asyncio

import pytest

from shared.cache import TenantCache


class Clock:
    """A hand-driven monotonic clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Down(Exception):
    """A source that cannot be reached."""


def _put(cache: TenantCache, tenant: str, value, key=None) -> None:
    cache.put(tenant, value, generation=cache.generation(tenant, key), key=key)


def test_two_tenants_with_the_same_key_never_see_each_other():
    """The same key under two tenants is two entries; a tenant without one misses."""
    cache: TenantCache[str] = TenantCache(10.0, clock=Clock())
    _put(cache, "t_b", "b's", key="name")
    assert cache.lookup("t_a", "name") == (False, None)
    _put(cache, "t_a", "a's", key="name")
    assert cache.lookup("t_a", "name") == (True, "a's")
    assert cache.lookup("t_b", "name") == (True, "b's")
    assert cache.lookup("t_c", "name") == (False, None)


async def test_a_load_is_per_tenant():
    """load() for one tenant never answers another with its value."""
    cache: TenantCache[str] = TenantCache(10.0, clock=Clock())
    assert await cache.load("t_b", _const("b"), key="k") == "b"
    assert await cache.load("t_a", _const("a"), key="k") == "a"
    assert await cache.load("t_b", _const("x"), key="k") == "b"


def test_an_invalidation_is_per_tenant():
    """Invalidating one tenant's entry leaves another's with the same key in place."""
    cache: TenantCache[str] = TenantCache(10.0, clock=Clock())
    _put(cache, "t_a", "a", key="k")
    _put(cache, "t_b", "b", key="k")
    before_b = cache.generation("t_b", "k")
    cache.invalidate("t_a", "k")
    assert cache.lookup("t_a", "k") == (False, None)
    assert cache.lookup("t_b", "k") == (True, "b")
    assert cache.generation("t_b", "k") == before_b


def test_tenant_id_must_be_a_string():
    """A key passed where the tenant goes is refused, not filed under it."""
    cache: TenantCache[str] = TenantCache(10.0)
    with pytest.raises(TypeError):
        cache.lookup(("t_a", "k"))  # type: ignore[arg-type]


def test_entries_expire_after_ttl():
    """Served until ttl has passed, a miss from then on (0 keeps nothing)."""
    clock = Clock()
    cache: TenantCache[str] = TenantCache(2.0, clock=clock)
    _put(cache, "t_a", "v")
    clock.now += 1.9
    assert cache.lookup("t_a") == (True, "v")
    clock.now += 0.1
    assert cache.lookup("t_a") == (False, None)
    off: TenantCache[str] = TenantCache(0, clock=clock)
    _put(off, "t_a", "v")
    assert off.lookup("t_a") == (False, None)


async def test_an_expired_entry_is_loaded_again():
    clock = Clock()
    cache: TenantCache[int] = TenantCache(1.0, clock=clock)
    calls = []

    async def load() -> int:
        calls.append(1)
        return len(calls)

    assert await cache.load("t_a", load) == 1
    assert await cache.load("t_a", load) == 1
    clock.now += 1.0
    assert await cache.load("t_a", load) == 2


def test_size_is_bounded_least_recently_used_first():
    """Past max_entries the least recently used entry goes (a hit counts as a use)."""
    cache: TenantCache[str] = TenantCache(10.0, max_entries=2, clock=Clock())
    _put(cache, "t_a", "a")
    _put(cache, "t_b", "b")
    assert cache.lookup("t_a") == (True, "a")  # now b is the least recent
    _put(cache, "t_c", "c")
    assert cache.lookup("t_b") == (False, None)
    assert cache.lookup("t_a") == (True, "a") and cache.lookup("t_c") == (True, "c")
    assert len(cache._entries) == 2


def test_a_put_that_raced_an_invalidation_is_not_kept():
    """A read that began before a write cannot store what it saw; one after it can."""
    cache: TenantCache[str] = TenantCache(10.0, clock=Clock())
    generation = cache.generation("t_a", "k")
    cache.invalidate("t_a", "k")
    cache.put("t_a", "stale", generation=generation, key="k")
    assert cache.lookup("t_a", "k") == (False, None)
    _put(cache, "t_a", "fresh", key="k")
    assert cache.lookup("t_a", "k") == (True, "fresh")


def test_clearing_the_generations_refuses_every_older_put():
    """The counters are bounded; a put read before they were cleared is still refused."""
    cache: TenantCache[str] = TenantCache(10.0, max_entries=1, clock=Clock())
    generation = cache.generation("t_a", "k")
    cache.invalidate("t_a", "k")
    for i in range(5):  # past 4 * max_entries: cleared
        cache.invalidate("t_x", i)
    assert len(cache._generations) <= 4
    cache.put("t_a", "stale", generation=generation, key="k")
    assert cache.lookup("t_a", "k") == (False, None)
    _put(cache, "t_a", "fresh", key="k")
    assert cache.lookup("t_a", "k") == (True, "fresh")


async def test_concurrent_misses_share_one_load():
    cache: TenantCache[str] = TenantCache(60.0)
    calls = []

    async def load() -> str:
        calls.append(1)
        await asyncio.sleep(0.01)
        return "v"

    got = await asyncio.gather(*(cache.load("t_a", load, key="k") for _ in range(10)))
    assert got == ["v"] * 10 and len(calls) == 1
    assert await cache.load("t_b", load, key="k") == "v" and len(calls) == 2  # another tenant: its own load


async def test_a_failed_load_is_shared_by_its_waiters_but_not_kept():
    """Waiters of a failing load see its error; the next caller loads again and succeeds."""
    cache: TenantCache[str] = TenantCache(60.0)
    calls = []

    async def failing() -> str:
        calls.append(1)
        await asyncio.sleep(0.01)
        raise Down()

    results = await asyncio.gather(*(cache.load("t_a", failing) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, Down) for r in results) and len(calls) == 1
    assert cache.lookup("t_a") == (False, None)
    assert await cache.load("t_a", _const("ok")) == "ok"
    assert cache.lookup("t_a") == (True, "ok")


async def test_waiters_of_a_cancelled_load_load_again_themselves():
    """The caller running the load goes away: its waiters are not cancelled with it, one of them loads."""
    cache: TenantCache[str] = TenantCache(60.0)
    started, release = asyncio.Event(), asyncio.Event()
    calls = []

    async def load() -> str:
        calls.append(1)
        started.set()
        await release.wait()
        return "v"

    first = asyncio.create_task(cache.load("t_a", load))
    await started.wait()
    waiters = [asyncio.create_task(cache.load("t_a", load)) for _ in range(3)]
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*waiters) == ["v"] * 3
    assert first.cancelled() and len(calls) == 2
    assert cache.lookup("t_a") == (True, "v")


async def test_a_load_begun_before_invalidate_is_neither_joined_nor_kept():
    cache: TenantCache[str] = TenantCache(60.0)
    release = asyncio.Event()
    version = {"v": "before"}

    async def load() -> str:
        seen = version["v"]
        await release.wait()
        return seen

    stale = asyncio.create_task(cache.load("t_a", load))
    await asyncio.sleep(0)
    version["v"] = "after"
    cache.invalidate("t_a")
    fresh = asyncio.create_task(cache.load("t_a", load))
    await asyncio.sleep(0)
    release.set()
    assert await stale == "before"
    assert await fresh == "after"
    assert await cache.load("t_a", load) == "after"


async def test_stale_on_error_serves_the_last_good_value_then_the_fallback():
    """A stale_on failure serves the last value (however old), else the fallback, else raises."""
    clock = Clock()
    cache: TenantCache[str] = TenantCache(1.0, clock=clock, stale_on=(Down,))

    async def down() -> str:
        raise Down()

    with pytest.raises(Down):
        await cache.load("t_a", down)
    assert await cache.load("t_a", down, fallback="defaults") == "defaults"
    assert await cache.load("t_b", _const("good")) == "good"
    clock.now += 5
    assert await cache.load("t_b", down, fallback="defaults") == "good"
    assert await cache.load("t_a", down) == "defaults"  # a stored fallback is t_a's last value, not t_b's


async def test_other_errors_are_not_served_stale():
    """Only the stale_on types are papered over: a refusal propagates even with a last value."""
    clock = Clock()
    cache: TenantCache[str] = TenantCache(1.0, clock=clock, stale_on=(Down,))
    assert await cache.load("t_a", _const("good")) == "good"
    clock.now += 5

    async def refused() -> str:
        raise PermissionError("no")

    with pytest.raises(PermissionError):
        await cache.load("t_a", refused, fallback="defaults")
    assert cache.lookup("t_a") == (False, None)


async def test_without_stale_on_a_failure_raises_even_with_a_last_value():
    clock = Clock()
    cache: TenantCache[str] = TenantCache(1.0, clock=clock)
    assert await cache.load("t_a", _const("good")) == "good"
    clock.now += 5

    async def down() -> str:
        raise Down()

    with pytest.raises(Down):
        await cache.load("t_a", down, fallback="defaults")


def _const(value: str):
    async def load() -> str:
        return value

    return load

"""The GetSecret read cache (a TenantCache): expiry, LRU bound, and invalidation beating a racing load."""

from __future__ import annotations

from shared.cache import TenantCache


class Clock:
    """A hand-driven monotonic clock."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_entries_expire_after_ttl():
    """A value is served until its ttl passes, then it is a miss."""
    clock = Clock()
    cache = TenantCache(1.0, clock=clock)
    cache.put("t_a", "v", generation=cache.generation("t_a", "k"), key="k")
    assert cache.lookup("t_a", "k") == (True, "v")
    clock.now = 1.5
    assert cache.lookup("t_a", "k") == (False, None)


def test_a_load_that_raced_an_invalidation_is_not_cached():
    """A reader that started before a write cannot cache what it read."""
    cache = TenantCache(10.0, clock=Clock())
    generation = cache.generation("t_a", "k")  # reader starts loading
    cache.invalidate("t_a", "k")  # a write commits meanwhile
    cache.put("t_a", "stale", generation=generation, key="k")  # reader finishes
    assert cache.lookup("t_a", "k") == (False, None)
    cache.put("t_a", "fresh", generation=cache.generation("t_a", "k"), key="k")
    assert cache.lookup("t_a", "k") == (True, "fresh")


def test_size_is_bounded_least_recent_first():
    """Past max_entries the least recently used entry goes."""
    cache = TenantCache(10.0, max_entries=2, clock=Clock())
    for key in ("a", "b"):
        cache.put("t_a", key, generation=0, key=key)
    cache.lookup("t_a", "a")
    cache.put("t_a", "c", generation=0, key="c")
    assert cache.lookup("t_a", "b") == (False, None)
    assert cache.lookup("t_a", "a") == (True, "a") and cache.lookup("t_a", "c") == (True, "c")

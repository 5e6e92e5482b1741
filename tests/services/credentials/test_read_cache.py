"""The GetSecret read cache: expiry, LRU bound, and invalidation beating a racing load."""

from __future__ import annotations

from services.credentials.read_cache import ReadCache


class Clock:
    """A hand-driven monotonic clock."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_entries_expire_after_ttl():
    """A value is served until its ttl passes, then it is a miss."""
    clock = Clock()
    cache = ReadCache(1.0, clock=clock)
    cache.put("k", "v", cache.generation("k"))
    assert cache.get("k") == (True, "v")
    clock.now = 1.5
    assert cache.get("k") == (False, None)


def test_a_load_that_raced_an_invalidation_is_not_cached():
    """A reader that started before a write cannot cache what it read."""
    cache = ReadCache(10.0, clock=Clock())
    generation = cache.generation("k")  # reader starts loading
    cache.invalidate("k")  # a write commits meanwhile
    cache.put("k", "stale", generation)  # reader finishes
    assert cache.get("k") == (False, None)
    cache.put("k", "fresh", cache.generation("k"))
    assert cache.get("k") == (True, "fresh")


def test_size_is_bounded_least_recent_first():
    """Past max_entries the least recently used entry goes."""
    cache = ReadCache(10.0, max_entries=2, clock=Clock())
    for key in ("a", "b"):
        cache.put(key, key, 0)
    cache.get("a")
    cache.put("c", "c", 0)
    assert cache.get("b") == (False, None) and cache.get("a") == (True, "a") and cache.get("c") == (True, "c")

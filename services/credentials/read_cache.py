"""Short-lived caches for the GetSecret hot path.

Reads must not cost a database round trip each (the local backend's target is thousands of reads
a second on SQLite). Writes in this process invalidate at once; a generation counter stops a read
that started before a write from caching what it saw. Other replicas see changes after `ttl`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ReadCache(Generic[K, V]):
    """A bounded LRU with a time-to-live and per-key generations."""

    def __init__(self, ttl: float, *, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl, self._max, self._clock = ttl, max_entries, clock
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._generations: dict[K, int] = {}

    def get(self, key: K) -> tuple[bool, V | None]:
        """(hit, value); expired entries are misses."""
        entry = self._entries.get(key)
        if entry is None or entry[0] < self._clock():
            return False, None
        self._entries.move_to_end(key)
        return True, entry[1]

    def generation(self, key: K) -> int:
        """Read before loading; pass to put() so a racing invalidation wins."""
        return self._generations.get(key, 0)

    def put(self, key: K, value: V, generation: int) -> None:
        """Remember value unless key was invalidated since `generation` was read."""
        if self._ttl <= 0 or self._generations.get(key, 0) != generation:
            return
        self._entries[key] = (self._clock() + self._ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def invalidate(self, key: K) -> None:
        """Forget key now and refuse puts that loaded before this moment."""
        self._entries.pop(key, None)
        self._generations[key] = self._generations.get(key, 0) + 1
        if len(self._generations) > 4 * self._max:  # keep the counters bounded
            self._generations.clear()
            self._entries.clear()

"""One bounded, per-tenant TTL cache for every service's hot-path reads.

Entries are filed under (tenant_id, key): a tenant can only ever read what was stored under its own
id. The cache is bounded (least recently used entries go first), each entry lives `ttl` seconds, and
`invalidate` beats a load already in flight: a read that began before a write never stores what it
saw (generations), and callers after the write never join it. `load` runs one load per entry at a
time; a failed load is not kept, so the next caller tries again (a cancelled one, its waiters at once).
With `stale_on`, a load failing with one of those exception types serves the entry's last value
(however old), else the caller's fallback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")

log = logging.getLogger(__name__)

_Slot = tuple[str, Hashable]


class TenantCache(Generic[V]):
    """Values by (tenant_id, key), each fresh for `ttl` seconds, at most `max_entries` kept."""

    def __init__(
        self,
        ttl: float,
        *,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        stale_on: tuple[type[BaseException], ...] = (),
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._ttl, self._max, self._clock, self._stale_on = ttl, max_entries, clock, stale_on
        self._entries: OrderedDict[_Slot, tuple[float, V]] = OrderedDict()  # slot -> (expires, value)
        self._generations: dict[_Slot, int] = {}  # slot -> counter at its last invalidation
        self._counter = 0  # every invalidation takes the next number
        self._floor = 0  # the generation of a slot not in _generations (raised when they are cleared)
        self._loading: dict[_Slot, asyncio.Future[V]] = {}

    @staticmethod
    def _slot(tenant_id: str, key: Hashable) -> _Slot:
        if not isinstance(tenant_id, str):
            raise TypeError("tenant_id must be a str")
        return (tenant_id, key)

    def lookup(self, tenant_id: str, key: Hashable = None) -> tuple[bool, V | None]:
        """(hit, value): expired and missing entries are misses."""
        slot = self._slot(tenant_id, key)
        entry = self._entries.get(slot)
        if entry is None or entry[0] <= self._clock():
            return False, None
        self._entries.move_to_end(slot)
        return True, entry[1]

    def generation(self, tenant_id: str, key: Hashable = None) -> int:
        """Read before loading; hand to put() with what was loaded, so a racing invalidate() wins."""
        return self._generations.get(self._slot(tenant_id, key), self._floor)

    def put(self, tenant_id: str, value: V, *, generation: int, key: Hashable = None) -> None:
        """Keep value unless the entry was invalidated since `generation` was read."""
        slot = self._slot(tenant_id, key)
        if self._generations.get(slot, self._floor) != generation:
            return
        if self._ttl <= 0 and not self._stale_on:
            return
        self._entries[slot] = (self._clock() + self._ttl, value)
        self._entries.move_to_end(slot)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def invalidate(self, tenant_id: str, key: Hashable = None) -> None:
        """Forget the entry and the load in flight (begun before the change: neither joined nor kept)."""
        slot = self._slot(tenant_id, key)
        self._entries.pop(slot, None)
        self._loading.pop(slot, None)
        self._counter += 1
        self._generations[slot] = self._counter
        if len(self._generations) > 4 * self._max:  # keep the counters bounded: every older load is refused
            self._generations.clear()
            self._floor = self._counter

    async def load(
        self, tenant_id: str, loader: Callable[[], Awaitable[V]], *, key: Hashable = None, fallback: V | None = None
    ) -> V:
        """The fresh value, else the one load in flight for it, else a new load by this caller."""
        slot = self._slot(tenant_id, key)
        hit, value = self.lookup(tenant_id, key)
        if hit:
            return value  # type: ignore[return-value]  # a hit is a stored V
        while (pending := self._loading.get(slot)) is not None:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not pending.cancelled() or (task is not None and task.cancelling()):
                    raise  # this caller was cancelled
                # the caller running the load was cancelled, not this one: load here instead
        hit, value = self.lookup(tenant_id, key)
        if hit:
            return value  # type: ignore[return-value]  # a hit is a stored V
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._loading[slot] = future
        try:
            value = await self._refresh(tenant_id, key, loader, fallback)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
                future.exception()  # retrieved: only the waiters care
            raise
        else:
            future.set_result(value)
            return value
        finally:
            if self._loading.get(slot) is future:
                del self._loading[slot]

    async def _refresh(
        self, tenant_id: str, key: Hashable, loader: Callable[[], Awaitable[V]], fallback: V | None
    ) -> V:
        generation = self.generation(tenant_id, key)
        try:
            value = await loader()
        except self._stale_on as exc:
            last = self._entries.get(self._slot(tenant_id, key))
            if last is None and fallback is None:
                raise
            log.warning("refresh failed (%s); using %s", type(exc).__name__, "last value" if last else "fallback")
            value = last[1] if last is not None else fallback  # type: ignore[assignment]
        self.put(tenant_id, value, generation=generation, key=key)
        return value

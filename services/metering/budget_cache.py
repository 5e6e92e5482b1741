"""Each tenant's budget specs, kept briefly in memory so a reservation need not read them every time.

Only the specs (unit, limit, period, hard/soft) are kept, never the counters: used and held are
read and moved in the database by every hold. A SetQuota on this replica drops its tenant's
entry at once. Staleness bound across replicas: another replica's SetQuota is seen here within
max_age, so for that long this replica may still hold against the old limits and periods.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from services.metering.quotas import BudgetSpec

Specs = dict[str, BudgetSpec]


class BudgetSpecCache:
    """Budget specs by tenant, each kept for max_age seconds (0 keeps nothing)."""

    def __init__(
        self, *, max_age_s: float = 2.0, max_tenants: int = 10_000, clock: Callable[[], float] = time.monotonic
    ):
        self._max_age_s = max_age_s
        self._max_tenants = max_tenants
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, Specs]] = OrderedDict()
        self._generation = 0  # bumped by every invalidate(): SetQuota is rare, so one counter will do

    def get(self, tenant_id: str) -> Specs | None:
        """The tenant's specs if kept and fresh, else None."""
        entry = self._entries.get(tenant_id)
        if entry is None:
            return None
        loaded, specs = entry
        if self._clock() - loaded >= self._max_age_s:
            del self._entries[tenant_id]
            return None
        return specs

    def generation(self) -> int:
        """Take before reading specs from the database; hand to put() with what was read."""
        return self._generation

    def put(self, tenant_id: str, specs: Specs, generation: int) -> None:
        """Keep specs read from the database, unless an invalidate() came in since they were read."""
        if self._max_age_s <= 0 or generation != self._generation:
            return
        self._entries[tenant_id] = (self._clock(), specs)
        self._entries.move_to_end(tenant_id)
        while len(self._entries) > self._max_tenants:
            self._entries.popitem(last=False)

    def invalidate(self, tenant_id: str) -> None:
        """Drop a tenant's specs (its quota changed here): a read in flight will not put old ones back."""
        self._entries.pop(tenant_id, None)
        self._generation += 1

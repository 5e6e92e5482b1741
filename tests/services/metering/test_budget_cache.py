"""The per-tenant budget spec cache: fresh for max_age, dropped by invalidate, never resurrected by a stale read."""

from __future__ import annotations

from services.metering.budget_cache import BudgetSpecCache
from services.metering.quotas import TOKENS, BudgetSpec

SPECS = {TOKENS: BudgetSpec(TOKENS, 100)}


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_specs_are_kept_for_max_age_only():
    """A put is served until max_age has passed, then read again."""
    clock = _Clock()
    cache = BudgetSpecCache(max_age_s=2.0, clock=clock)
    assert cache.get("t_a") is None
    cache.put("t_a", SPECS, cache.generation())
    clock.now += 1.9
    assert cache.get("t_a") == SPECS
    assert cache.get("t_b") is None
    clock.now += 0.1
    assert cache.get("t_a") is None


def test_invalidate_drops_specs_and_refuses_reads_that_started_before_it():
    """A read that began before a SetQuota cannot put the old specs back after it."""
    cache = BudgetSpecCache(max_age_s=60, clock=_Clock())
    cache.put("t_a", SPECS, cache.generation())
    before = cache.generation()
    cache.invalidate("t_a")
    assert cache.get("t_a") is None
    cache.put("t_a", SPECS, before)
    assert cache.get("t_a") is None
    cache.put("t_a", {}, cache.generation())
    assert cache.get("t_a") == {}


def test_zero_max_age_keeps_nothing_and_size_is_bounded():
    """max_age 0 disables the cache; past max_tenants the oldest entry goes."""
    off = BudgetSpecCache(max_age_s=0, clock=_Clock())
    off.put("t_a", SPECS, off.generation())
    assert off.get("t_a") is None
    small = BudgetSpecCache(max_age_s=60, max_tenants=2, clock=_Clock())
    for tenant in ("t_a", "t_b", "t_c"):
        small.put(tenant, SPECS, small.generation())
    assert (small.get("t_a"), small.get("t_b"), small.get("t_c")) == (None, SPECS, SPECS)

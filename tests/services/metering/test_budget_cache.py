"""The per-tenant budget spec cache: fresh for max_age, dropped by invalidate, never resurrected by a stale read."""

from __future__ import annotations

from services.metering.budgets import budget_spec_cache
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
    cache = budget_spec_cache(2.0, clock=clock)
    assert cache.lookup("t_a")[1] is None
    cache.put("t_a", SPECS, generation=cache.generation("t_a"))
    clock.now += 1.9
    assert cache.lookup("t_a")[1] == SPECS
    assert cache.lookup("t_b")[1] is None
    clock.now += 0.1
    assert cache.lookup("t_a")[1] is None


def test_invalidate_drops_specs_and_refuses_reads_that_started_before_it():
    """A read that began before a SetQuota cannot put the old specs back after it."""
    cache = budget_spec_cache(60, clock=_Clock())
    cache.put("t_a", SPECS, generation=cache.generation("t_a"))
    before = cache.generation("t_a")
    cache.invalidate("t_a")
    assert cache.lookup("t_a")[1] is None
    cache.put("t_a", SPECS, generation=before)
    assert cache.lookup("t_a")[1] is None
    cache.put("t_a", {}, generation=cache.generation("t_a"))
    assert cache.lookup("t_a")[1] == {}


def test_zero_max_age_keeps_nothing_and_size_is_bounded():
    """max_age 0 disables the cache; past max_tenants the oldest entry goes."""
    off = budget_spec_cache(0, clock=_Clock())
    off.put("t_a", SPECS, generation=off.generation("t_a"))
    assert off.lookup("t_a")[1] is None
    small = budget_spec_cache(60, max_tenants=2, clock=_Clock())
    for tenant in ("t_a", "t_b", "t_c"):
        small.put(tenant, SPECS, generation=small.generation(tenant))
    assert (small.lookup("t_a")[1], small.lookup("t_b")[1], small.lookup("t_c")[1]) == (None, SPECS, SPECS)

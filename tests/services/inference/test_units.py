"""The proxy's counting parts on their own: rate limits, budget leases, the shared cache, the token estimate."""

from __future__ import annotations

import asyncio

import pytest

from services.inference import wire
from services.inference.budget import BudgetLeases, BudgetRefused, Grant, Tokens
from services.inference.limits import Limits, RateLimiter, Rejected
from shared.cache import TenantCache
from shared.tenancy import TenantContext
from testkit.fake_anthropic import count_words

from .helpers import params


class Clock:
    """A clock moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_minute_refill():
    """Two per minute: the third is refused with the wait until one refills; after it, admitted again."""
    clock = Clock()
    limiter = RateLimiter(clock)
    limits = Limits(requests_per_minute=2)
    for _ in range(2):
        limiter.admit("t_a", limits, 1).settle(1)
    with pytest.raises(Rejected) as info:
        limiter.admit("t_a", limits, 1)
    assert info.value.retry_after == pytest.approx(30.0)
    limiter.admit("t_b", limits, 1)  # other tenants have their own buckets
    clock.now += 30
    limiter.admit("t_a", limits, 1)


def test_tokens_per_minute_settles_to_real_usage():
    """A call holds its estimate; settling with less gives the difference back."""
    clock = Clock()
    limiter = RateLimiter(clock)
    limits = Limits(tokens_per_minute=100)
    limiter.admit("t_a", limits, 90).settle(10)
    limiter.admit("t_a", limits, 90).settle(90)
    with pytest.raises(Rejected):
        limiter.admit("t_a", limits, 90)


class FakeMetering:
    """An in-memory lease backend with a hard budget (the real one is exercised in test_quotas)."""

    def __init__(self, budget: int):
        self.left = budget
        self.spent: dict[str, int] = {}
        self.leases = 0
        self.renewals: list[tuple[str, int, int]] = []

    async def lease(self, model: str, tokens: int, min_tokens: int) -> Grant:
        if self.left < min_tokens:
            raise BudgetRefused("exhausted", [("budget", "exhausted")], 1.0)
        granted = min(tokens, self.left)
        self.left -= granted
        self.leases += 1
        lease_id = f"l{self.leases}"
        self.spent[lease_id] = -granted
        return Grant(lease_id, granted, 60.0)

    async def renew(self, lease_id: str, spent: Tokens, in_flight: int = 0) -> None:
        self.renewals.append((lease_id, spent.total, in_flight))

    async def release(self, lease_id: str, spent: Tokens) -> None:
        granted = -self.spent[lease_id]
        self.left += granted - spent.total
        self.spent[lease_id] = spent.total


async def test_leases_never_hold_more_than_granted():
    """Holds beyond a lease borrow only what the leases lack (a hold may span leases); when the budget
    is gone the call is refused, not overspent."""
    ctx = TenantContext("t_a", "p")
    metering = FakeMetering(budget=250)
    leases = BudgetLeases(metering, slice_tokens=100, clock=Clock(), borrow_wait=0.1)
    holds = [await leases.hold(ctx, "m", 80) for _ in range(2)]
    assert metering.leases == 2 and metering.left == 50
    holds.append(await leases.hold(ctx, "m", 80))  # 20 + 20 free in the leases, 40 borrowed of the 50 left
    assert metering.leases == 3 and metering.left == 0
    with pytest.raises(BudgetRefused) as refused:  # 10 free here, nothing in metering: 240 + 80 > 250
        await leases.hold(ctx, "m", 80)
    assert "holds 240 for calls in flight, 10 free" in str(refused.value)
    for h in holds:
        leases.settle(h, Tokens(input=30, output=20))
    await leases.close()
    assert metering.left == 250 - 3 * 50


class SlowMetering(FakeMetering):
    """Releases take a while and are counted per lease."""

    def __init__(self, budget: int):
        super().__init__(budget)
        self.releases: list[str] = []

    async def release(self, lease_id: str, spent: Tokens) -> None:
        self.releases.append(lease_id)
        await asyncio.sleep(0.05)
        await super().release(lease_id, spent)


async def test_a_lease_being_returned_takes_no_call_and_goes_back_once():
    """While an idle lease's release is in flight, a new call does not hold on it (its spend would go
    uncharged) but borrows anew; the idle timer and maintenance never release one lease twice."""
    ctx = TenantContext("t_a", "p")
    metering = SlowMetering(budget=1000)
    clock = Clock()
    leases = BudgetLeases(metering, slice_tokens=100, clock=clock, idle_release=0.01)
    leases.settle(await leases.hold(ctx, "m", 80), Tokens(input=10, output=10))  # idle from now
    clock.now += 1.0
    returning = asyncio.create_task(leases.maintain())
    await asyncio.sleep(0.01)  # the release is in flight
    late = await leases.hold(ctx, "m", 10)
    await returning
    assert metering.leases == 2 and metering.releases == ["l1"]
    leases.settle(late, Tokens(input=5, output=5))
    await asyncio.sleep(0.1)  # the idle timer fires for l2 alone
    await leases.close()
    assert sorted(metering.releases) == ["l1", "l2"]
    assert metering.left == 1000 - 20 - 10


async def test_cache_loads_once_for_concurrent_misses():
    """Concurrent misses of one tenant share one load."""
    loads = 0

    async def load():
        nonlocal loads
        loads += 1
        await asyncio.sleep(0.01)
        return "policy"

    cache = TenantCache(5.0)
    got = await asyncio.gather(*(cache.load("t_a", load) for _ in range(20)))
    assert got == ["policy"] * 20 and loads == 1


def test_input_estimate_bounds_the_fake_upstream_count():
    """The byte-based estimate is never below the upstream's count, so reservations cover the real input."""
    for text in ("hi", "a b c d e f g", "naïve café ünïcode words " * 20):
        body = wire.params_to_json(params(text), model="m", max_tokens=10)
        assert wire.estimate_input_tokens(body) >= count_words([body.get("system", ""), body["messages"]])

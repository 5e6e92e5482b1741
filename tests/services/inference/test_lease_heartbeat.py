"""The proxy's budget leases after a crash elsewhere: short leases kept alive by a heartbeat that
reports the calls in flight, leases metering no longer holds dropped, and calls that wait for a
dead holder's leases to come back instead of being refused (fake metering, hand-moved clock)."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.inference.budget import BudgetLeases, BudgetRefused, Grant, LeaseGone, Tokens
from shared.tenancy import TenantContext

from .test_units import Clock, FakeMetering

CTX = TenantContext("t_a", "p")
TTL = 6.0


class ShortLeases(FakeMetering):
    """Leases of TTL seconds; `gone` lists leases metering no longer holds (expired there)."""

    def __init__(self, budget: int):
        super().__init__(budget)
        self.gone: set[str] = set()

    async def lease(self, model: str, tokens: int, min_tokens: int) -> Grant:
        grant = await super().lease(model, tokens, min_tokens)
        return Grant(grant.lease_id, grant.tokens, TTL)

    async def renew(self, lease_id: str, spent: Tokens, in_flight: int = 0) -> None:
        if lease_id in self.gone:
            raise LeaseGone("LEASE_EXPIRED")
        await super().renew(lease_id, spent, in_flight)

    async def release(self, lease_id: str, spent: Tokens) -> None:
        if lease_id in self.gone:
            raise LeaseGone("LEASE_EXPIRED")
        await super().release(lease_id, spent)


async def test_a_held_lease_is_renewed_every_third_of_its_ttl_with_its_calls_in_flight():
    """Nothing changes on a lease a long call holds, yet maintenance renews it once 2 s of its 6 s have
    gone (the heartbeat), reporting what the call holds; spend and in-flight changes go at the next round."""
    metering, clock = ShortLeases(budget=1000), Clock()
    leases = BudgetLeases(metering, slice_tokens=300, clock=clock, idle_release=5.0)
    hold = await leases.hold(CTX, "m", 120)
    await leases.maintain()
    assert metering.renewals == [("l1", 0, 120)]  # news: a call in flight
    clock.now += 1.5
    await leases.maintain()
    assert len(metering.renewals) == 1  # nothing new, 4.5 of 6 s left: no RPC
    clock.now += 0.6
    await leases.maintain()
    assert metering.renewals[-1] == ("l1", 0, 120)  # a third gone: the heartbeat
    leases.settle(hold, Tokens(input=40, output=30))
    await leases.maintain()
    assert metering.renewals[-1] == ("l1", 70, 0)  # the call ended: its spend, nothing in flight
    assert len(metering.renewals) == 3
    await leases.close()


async def test_in_flight_is_reported_within_what_is_left_of_the_grant():
    """A call that spent past its hold (retries) leaves less room: in flight never passes grant - spent."""
    metering, clock = ShortLeases(budget=1000), Clock()
    leases = BudgetLeases(metering, slice_tokens=100, clock=clock, idle_release=5.0)
    first = await leases.hold(CTX, "m", 60)
    second = await leases.hold(CTX, "m", 40)
    leases.settle(first, Tokens(output=90))  # 90 spent; 40 held in a lease of 100
    await leases.maintain()
    assert metering.renewals[-1] == ("l1", 90, 10)
    leases.settle(second, Tokens(output=5))
    await leases.close()


async def test_a_lease_metering_expired_is_dropped_and_takes_no_more_calls():
    """A renewal refused because the lease expired at metering (metering was out of reach for longer
    than the TTL) drops the lease: the next call borrows a new one, and no RPC names the old one again."""
    metering, clock = ShortLeases(budget=1000), Clock()
    leases = BudgetLeases(metering, slice_tokens=300, clock=clock, idle_release=5.0)
    leases.settle(await leases.hold(CTX, "m", 100), Tokens(output=50))
    metering.gone.add("l1")
    await leases.maintain()  # spend changed: renew -> LEASE_EXPIRED
    assert leases.held_tokens("t_a") == 0
    hold = await leases.hold(CTX, "m", 100)
    assert metering.leases == 2
    leases.settle(hold, Tokens(output=10))
    renewals_before = len(metering.renewals)
    await leases.close()
    assert all(lease_id != "l1" for lease_id, *_ in metering.renewals[renewals_before:])


class DeadHolderElsewhere(ShortLeases):
    """Metering where another replica was killed holding `stranded` tokens of the budget: refusals say
    so (held, and the earliest expiry) until those leases expire `comes_back` seconds from now."""

    def __init__(self, budget: int, stranded: int, comes_back: float, *, retry_after: float | None = None):
        super().__init__(budget - stranded)
        self.budget, self.stranded = budget, stranded
        self.back_at = time.monotonic() + comes_back
        self.retry_after = retry_after
        self.refusals = 0

    async def lease(self, model: str, tokens: int, min_tokens: int) -> Grant:
        now = time.monotonic()
        if self.stranded and now >= self.back_at:
            self.left += self.stranded  # the dead holder's leases expired: swept back
            self.stranded = 0
        if self.left < min_tokens:
            self.refusals += 1
            used = self.budget - self.left - self.stranded - sum(-v for v in self.spent.values() if v < 0)
            held = self.budget - self.left - used
            wait = self.retry_after if self.retry_after is not None else max(0.0, self.back_at - now)
            raise BudgetRefused(
                "tokens budget exhausted",
                [("budget:tokens", f"needs {min_tokens}; used {used}, held {held}, limit {self.budget}")],
                wait,
            )
        return await super().lease(model, tokens, min_tokens)


async def test_a_call_waits_for_a_dead_replicas_leases_instead_of_being_refused():
    """Another replica died holding most of the budget; its leases expire in 0.6 s. The call borrow_wait
    (0.1 s) alone would refuse is served once they are back, because metering says they expire soon."""
    metering = DeadHolderElsewhere(budget=1000, stranded=900, comes_back=0.6)
    leases = BudgetLeases(metering, slice_tokens=300, borrow_wait=0.1, stranded_wait=3.0)
    started = time.monotonic()
    hold = await leases.hold(CTX, "m", 250)
    waited = time.monotonic() - started
    assert 0.5 < waited < 2.0 and metering.refusals >= 2
    leases.settle(hold, Tokens(output=10))
    await leases.close()


async def test_budget_held_elsewhere_for_longer_than_the_stranded_wait_is_refused_after_borrow_wait():
    """When metering's earliest expiry is beyond stranded_wait (live holders keep renewing, or a long
    reservation), the call is refused after borrow_wait as before, with metering's figures."""
    metering = DeadHolderElsewhere(budget=1000, stranded=900, comes_back=60.0, retry_after=30.0)
    leases = BudgetLeases(metering, slice_tokens=300, borrow_wait=0.1, stranded_wait=3.0)
    started = time.monotonic()
    with pytest.raises(BudgetRefused) as refused:
        await leases.hold(CTX, "m", 250)
    assert time.monotonic() - started < 1.0
    assert "held 900, limit 1000" in str(refused.value.violations)


async def test_queued_calls_share_one_wait_for_a_dead_replicas_leases():
    """Ten calls queued behind the lease lock wait out one episode together, not ten in turn: all are
    served soon after the stranded leases come back."""
    metering = DeadHolderElsewhere(budget=1000, stranded=900, comes_back=0.5)
    leases = BudgetLeases(metering, slice_tokens=100, borrow_wait=0.1, stranded_wait=3.0)
    started = time.monotonic()
    holds = await asyncio.gather(*(leases.hold(CTX, "m", 60) for _ in range(10)))
    assert time.monotonic() - started < 1.5
    for hold in holds:
        leases.settle(hold, Tokens(output=1))
    await leases.close()


class SlowPlatform:
    """The proxy's platform key at metering (ReleaseTenantLease), answering only when `answer` is set."""

    def __init__(self, metering: FakeMetering):
        self.metering, self.answer, self.released = metering, asyncio.Event(), []

    async def release_for(self, ctx: TenantContext, lease_id: str, spent: Tokens) -> None:
        await self.answer.wait()
        await ShortLeases.release(self.metering, lease_id, spent)  # the platform key is not refused
        self.released.append(lease_id)


class RefusesSuspended(ShortLeases):
    """Metering that refuses the tenant's own token once it is suspended."""

    def __init__(self, budget: int, suspended: set[str]):
        super().__init__(budget)
        self.suspended = suspended

    async def release(self, lease_id: str, spent: Tokens) -> None:
        if CTX.tenant_id in self.suspended:
            raise PermissionError("TENANT_SUSPENDED")
        await super().release(lease_id, spent)


async def test_a_suspended_tenants_lease_counts_as_held_until_metering_took_it_back():
    """Suspended: the lease goes back with the platform key, and this replica counts it as held until
    metering answered (out of the list is not yet back at metering)."""
    suspended: set[str] = set()
    metering = RefusesSuspended(budget=1000, suspended=suspended)
    platform = SlowPlatform(metering)
    leases = BudgetLeases(
        metering, slice_tokens=300, idle_release=5.0, platform=platform, suspended=suspended.__contains__
    )
    leases.settle(await leases.hold(CTX, "m", 100), Tokens(output=40))
    suspended.add(CTX.tenant_id)
    round_ = asyncio.create_task(leases.maintain())
    await asyncio.sleep(0.05)
    assert leases.held_tokens("t_a") == 300  # the release is in flight: still held
    platform.answer.set()
    await round_
    assert leases.held_tokens("t_a") == 0 and platform.released == ["l1"]
    assert metering.left == 1000 - 40  # back at metering, its spend charged


async def test_a_lease_going_back_when_the_tenant_is_suspended_goes_with_the_platform_key():
    """An idle lease whose return starts after the tenant was suspended (its own token refused) is
    released with the platform key at once, not refused and left for a later round."""
    suspended: set[str] = set()
    metering = RefusesSuspended(budget=1000, suspended=suspended)
    platform = SlowPlatform(metering)
    platform.answer.set()
    leases = BudgetLeases(
        metering, slice_tokens=300, idle_release=0.05, platform=platform, suspended=suspended.__contains__
    )
    hold = await leases.hold(CTX, "m", 100)
    lease = leases._leases[(CTX.tenant_id, "m")][0]
    leases.settle(hold, Tokens(output=10))
    suspended.add(CTX.tenant_id)
    leases._leases[(CTX.tenant_id, "m")].remove(lease)  # as the idle path does, just before its RPC
    await leases._give_back((CTX.tenant_id, "m"), CTX, lease)
    assert platform.released == ["l1"] and leases.held_tokens("t_a") == 0
    assert metering.left == 1000 - 10

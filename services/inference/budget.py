"""Budget leases: a replica holds slices of a tenant's budget and spends them locally.

Metering grants leases atomically, so the leases of all replicas never add up to more than
the budget; this module makes sure a replica never spends more than it holds. Each call
holds its worst case (input estimate + max_tokens) before the upstream request and settles
its real usage after. No grpc imports: metering is reached through a BudgetBackend.

So that a call is refused only when used + in flight + its own hold exceed the budget:
- a hold may span the room left in several leases (no slice is stranded by fragmentation),
  and a replica out of room borrows from the pool only what its leases lack (metering grants
  a smaller lease, down to that);
- a lease goes back when no call has held it for `idle_release` seconds (a timer, not the
  maintenance tick), and one metering granted short of the slice asked (the pool is nearly
  spoken for) as soon as no call holds it, so other replicas can borrow it;
- when metering refuses, the replica retries for up to `borrow_wait` seconds (other replicas'
  calls finish and their leases come back) before refusing (the calls of one episode without
  budget share its deadline), unless nothing is held anywhere that could come back; when other
  holders hold budget that expires within `stranded_wait` (a killed replica's leases), it waits
  up to that long instead, so the budget such a crash leaves held is served, not refused.

Leases are short (the grant's TTL, 6 s from the metering client) and kept alive by a heartbeat:
maintenance renews each lease once a third of its TTL has gone (and whenever its spend or its
calls in flight changed), reporting the tokens its calls in flight hold. A replica killed with
kill -9 stops renewing, so its leases come back within one TTL, charged at metering with their
spend and those calls in flight (the attempt journal meters the same calls at their reservation).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from shared.tenancy import TenantContext, tenant_scope

log = logging.getLogger("bulkhead.inference.budget")

_FIGURES = re.compile(r"needs (\d+); used (\d+), held (\d+), limit (\d+)")
"""Metering's refusal figures; `held` counts the leases and reservations of every replica."""


@dataclass
class Tokens:
    """Token counts of one call or a sum of calls, by kind."""

    input: int = 0
    output: int = 0
    cache_write: int = 0
    cache_read: int = 0

    @property
    def total(self) -> int:
        """Every token; what token budgets count."""
        return self.input + self.output + self.cache_write + self.cache_read

    def add(self, other: Tokens) -> None:
        """Add other to these counts in place."""
        self.input += other.input
        self.output += other.output
        self.cache_write += other.cache_write
        self.cache_read += other.cache_read


@dataclass(frozen=True)
class Grant:
    """A lease metering granted."""

    lease_id: str
    tokens: int
    ttl: float


class BudgetRefused(Exception):
    """Metering has no budget left to lease; carries its quota violations and retry hint."""

    def __init__(self, message: str, violations: list[tuple[str, str]], retry_after: float | None):
        super().__init__(message)
        self.violations = violations
        self.retry_after = retry_after


class BackendUnavailable(Exception):
    """Metering could not be reached."""


class LeaseGone(Exception):
    """Metering no longer holds the lease open (it expired there, or was settled): nothing more can be
    charged on it, so it is dropped, never retried."""


class BudgetBackend(Protocol):
    """Metering's lease RPCs, called with the tenant's context bound."""

    async def lease(self, model: str, tokens: int, min_tokens: int) -> Grant: ...

    async def renew(self, lease_id: str, spent: Tokens, in_flight: int = 0) -> None: ...

    async def release(self, lease_id: str, spent: Tokens) -> None: ...


class PlatformLeases(Protocol):
    """Settles a tenant's lease with the proxy's own platform key (ReleaseTenantLease)."""

    async def release_for(self, ctx: TenantContext, lease_id: str, spent: Tokens) -> None: ...


def _never(tenant_id: str) -> bool:
    return False


@dataclass
class _Lease:
    lease_id: str
    granted: int
    expires_at: float
    ttl: float = 60.0
    """Its time to live at metering; a renewal extends it by that much."""
    spent: Tokens = field(default_factory=Tokens)
    held: int = 0
    reported: int = 0
    reported_in_flight: int = 0
    """The calls in flight last reported to metering (charged there if the lease expires)."""
    last_used: float = 0.0
    short: bool = False
    """Granted less than the slice asked: the pool is tight, so it goes back as soon as it is idle."""
    timer: asyncio.TimerHandle | None = None
    """The pending idle check."""

    @property
    def available(self) -> int:
        return self.granted - self.spent.total - self.held


@dataclass
class Hold:
    """Budget held for one call; settle it exactly once."""

    key: tuple[str, str]
    parts: list[tuple[_Lease, int]]
    """The leases it holds in, and how much of each."""
    amount: int
    settled: bool = False


class BudgetLeases:
    """Leases per (tenant, model) on this replica; the hot path makes no RPC while a lease has room."""

    def __init__(
        self,
        backend: BudgetBackend,
        *,
        slice_tokens: int = 20_000,
        idle_release: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        platform: PlatformLeases | None = None,
        suspended: Callable[[str], bool] = _never,
        borrow_wait: float = 1.0,
        stranded_wait: float = 7.5,
    ):
        """platform and suspended: how a suspended tenant's leases go back (its own token is refused).

        stranded_wait: how long a call waits for budget other holders hold when metering says a hold
        expires within that time (a dead replica's leases come back within their TTL); longer than
        the leases' TTL.
        """
        self._backend = backend
        self._platform = platform
        self._suspended = suspended
        self._slice = slice_tokens
        self._idle_release = idle_release
        self._clock = clock
        self._leases: dict[tuple[str, str], list[_Lease]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._contexts: dict[str, TenantContext] = {}
        self._borrow_wait = borrow_wait
        self._stranded_wait = stranded_wait
        self._episodes: dict[tuple[str, str], list[float]] = {}
        """Per key, the episode without budget in progress: [start, deadline] (monotonic)."""
        self._returning: set[asyncio.Task] = set()
        self._going_back: list[tuple[str, _Lease]] = []
        """(tenant, lease) out of the list whose release metering has not answered yet: still held."""

    async def hold(self, ctx: TenantContext, model: str, amount: int) -> Hold:
        """Hold `amount` tokens of the tenant's budget for one call (BudgetRefused / BackendUnavailable)."""
        key = (ctx.tenant_id, model)
        self._contexts[ctx.tenant_id] = ctx
        held = self._take(key, amount)
        if held is not None:
            return held
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            return await self._borrow(key, model, amount)

    async def _borrow(self, key: tuple[str, str], model: str, amount: int) -> Hold:
        """Lease what this replica lacks for the call, retrying a refusal while room may come back."""
        # An episode lasts while no call here gets budget; its calls share one deadline, so a queue of
        # them is not waited out one by one, and a refusal means nothing came back for borrow_wait
        # (or, for budget other holders hold that expires soon, for stranded_wait).
        now = time.monotonic()
        episode = self._episodes.get(key)
        if episode is None or now > episode[1] + self._borrow_wait:
            episode = self._episodes[key] = [now, now + self._borrow_wait]
        while True:
            held = self._take(key, amount)  # another call may have leased, or settled, meanwhile
            if held is not None:
                self._episodes.pop(key, None)  # budget came back: the episode is over
                return held
            await self._release_spent(key)
            lacking = amount - self._room(key)
            try:
                grant = await self._backend.lease(model, max(amount, self._slice), lacking)
            except BudgetRefused as refused:
                now = time.monotonic()
                if self._expires_elsewhere(key, refused):
                    episode[1] = max(episode[1], episode[0] + self._stranded_wait)
                if now < episode[1] and self._may_come_back(key, refused):
                    await asyncio.sleep(0.05 if now - episode[0] < self._borrow_wait else 0.2)
                    continue
                raise self._refusal(key, amount, refused) from None
            self._episodes.pop(key, None)
            lease = _Lease(
                grant.lease_id,
                grant.tokens,
                self._clock() + grant.ttl,
                ttl=grant.ttl,
                short=grant.tokens < max(amount, self._slice),
            )
            self._leases.setdefault(key, []).append(lease)
            if grant.tokens < lacking:  # metering broke its promise
                raise BudgetRefused("budget lease too small", [("budget", "lease smaller than the call")], None)
            # Calls outside the lock may have taken the older leases' room meanwhile: then lease again.

    def _may_come_back(self, key: tuple[str, str], refused: BudgetRefused) -> bool:
        """Whether waiting can help: calls in flight here, holds elsewhere (metering's `held` above our
        leases), or room that came back between metering's check and its figures (a lease returned)."""
        leases = self._leases.get(key, ())
        if any(lease.held for lease in leases):
            return True
        figures = next((m for _, text in refused.violations if (m := _FIGURES.search(text))), None)
        if figures is None:
            return True
        needs, used, held, limit = (int(figures.group(n)) for n in range(1, 5))
        return limit - used - held >= needs or held > sum(lease.granted - lease.spent.total for lease in leases)

    def _expires_elsewhere(self, key: tuple[str, str], refused: BudgetRefused) -> bool:
        """Whether other holders hold budget and metering says a hold expires within stranded_wait: a killed
        replica's leases, which come back within their TTL (live holders' leases go back when idle)."""
        if refused.retry_after is None or refused.retry_after > self._stranded_wait:
            return False
        figures = next((m for _, text in refused.violations if (m := _FIGURES.search(text))), None)
        if figures is None:
            return False
        held = int(figures.group(3))
        return held > sum(lease.granted - lease.spent.total for lease in self._leases.get(key, ()))

    def _refusal(self, key: tuple[str, str], amount: int, refused: BudgetRefused) -> BudgetRefused:
        """Metering's refusal (used, held, limit) with what this replica adds: its calls in flight and its free room."""
        leases = self._leases.get(key, ())
        in_flight = sum(lease.held for lease in leases)
        figures = (
            f"this replica: needs {amount}, holds {in_flight} for calls in flight, {self._room(key)} free in its leases"
        )
        return BudgetRefused(
            f"{refused}; {figures}", [*refused.violations, ("budget:replica", figures)], refused.retry_after
        )

    def settle(self, hold: Hold, used: Tokens) -> None:
        """Charge the call's real usage to its leases and free the rest of the hold."""
        if hold.settled:
            return
        hold.settled = True
        caps = [part for _, part in hold.parts]
        for (lease, part), share in zip(hold.parts, _split(used, caps), strict=True):
            lease.held -= part
            lease.spent.add(share)
            if lease.held == 0:
                self._when_idle(hold.key, lease)
        if used.total > hold.amount:
            log.warning("call used %d tokens, more than the %d held", used.total, hold.amount)

    def _when_idle(self, key: tuple[str, str], lease: _Lease) -> None:
        """A lease no call holds goes back: a short one at once, others after idle_release unless used again."""
        if lease.short:
            self._return_now(key, lease)
            return
        if lease.timer is not None:
            lease.timer.cancel()

        def check() -> None:
            lease.timer = None
            if lease.held == 0 and self._clock() - lease.last_used >= self._idle_release * 0.9:
                self._return_now(key, lease)

        lease.timer = asyncio.get_running_loop().call_later(max(self._idle_release, 0.0), check)

    def _return_now(self, key: tuple[str, str], lease: _Lease) -> None:
        """Give an idle short lease back at once (out of the list first, so no call takes from it meanwhile)."""
        leases = self._leases.get(key)
        ctx = self._contexts.get(key[0])
        if not leases or lease not in leases or ctx is None or self._suspended(key[0]):
            return
        leases.remove(lease)
        task = asyncio.get_running_loop().create_task(self._give_back(key, ctx, lease))
        self._returning.add(task)
        task.add_done_callback(self._returning.discard)

    def release_unused(self, hold: Hold) -> None:
        """Free a hold whose call never reached the upstream."""
        self.settle(hold, Tokens())

    def held_tokens(self, tenant_id: str) -> int:
        """Tokens this replica holds in leases for a tenant (granted, any model), counting leases out of
        the list whose release metering has not answered yet (they are still held there)."""
        return sum(
            lease.granted for (t, _), leases in self._leases.items() if t == tenant_id for lease in leases
        ) + sum(lease.granted for t, lease in self._going_back if t == tenant_id)

    @contextmanager
    def _releasing(self, tenant_id: str, lease: _Lease) -> Iterator[None]:
        """While a lease's release RPC runs: counted as held (held_tokens) until metering answers."""
        entry = (tenant_id, lease)
        self._going_back.append(entry)
        try:
            yield
        finally:
            self._going_back = [e for e in self._going_back if e[1] is not lease]

    async def maintain(self) -> None:
        """Return idle or spent leases, and renew the rest (the heartbeat) once a third of their TTL
        has gone or their spend or calls in flight changed (run every second). The RPCs of one round
        run concurrently, so one slow answer does not let other leases expire."""
        now = self._clock()
        work = []
        for key, leases in list(self._leases.items()):
            ctx = self._contexts.get(key[0])
            if ctx is None:
                continue
            if self._suspended(key[0]):
                await self._hand_back(ctx, leases)
                if not leases:
                    self._leases.pop(key, None)
                continue
            for lease in list(leases):
                idle = lease.held == 0 and now - lease.last_used > self._idle_release
                if lease.held == 0 and (idle or lease.available <= 0):
                    leases.remove(lease)  # before the await: no call may take from a lease being returned
                    work.append(self._give_back(key, ctx, lease))
                elif (
                    lease.expires_at - now < lease.ttl * 2 / 3
                    or lease.spent.total != lease.reported
                    or self._in_flight(lease) != lease.reported_in_flight
                ):
                    work.append(self._heartbeat(key, ctx, lease, now))
        if work:
            await asyncio.gather(*work)
        for key, leases in list(self._leases.items()):
            if not leases:
                self._leases.pop(key, None)

    async def _heartbeat(self, key: tuple[str, str], ctx: TenantContext, lease: _Lease, now: float) -> None:
        """Renew a lease with its spend and calls in flight; one metering no longer holds is dropped."""
        spent, in_flight = self._reportable(lease), self._in_flight(lease)
        try:
            with tenant_scope(ctx):
                await self._backend.renew(lease.lease_id, spent, in_flight)
        except LeaseGone:
            log.warning("lease %s expired or settled at metering; no call takes from it any more", lease.lease_id)
            self._drop(key, lease)
            return
        except BackendUnavailable:
            log.warning("metering unreachable; lease %s kept (usable until its local expiry)", lease.lease_id)
            return
        except Exception:
            log.exception("renewing lease %s failed", lease.lease_id)
            return
        lease.reported, lease.reported_in_flight = spent.total, in_flight
        lease.expires_at = now + lease.ttl  # `now` is before the RPC: never later than metering's expiry

    async def _give_back(self, key: tuple[str, str], ctx: TenantContext, lease: _Lease) -> None:
        """Release a lease already out of the list; put it back for the next round unless metering settled it.
        A tenant suspended meanwhile (its own token is refused) gets it back with the platform key."""
        try:
            with self._releasing(key[0], lease):
                if self._suspended(key[0]) and self._platform is not None:
                    await self._platform.release_for(ctx, lease.lease_id, self._reportable(lease))
                else:
                    with tenant_scope(ctx):
                        await self._backend.release(lease.lease_id, self._reportable(lease))
        except LeaseGone:
            log.warning("lease %s expired or settled at metering before its release; dropped", lease.lease_id)
        except BackendUnavailable:
            log.warning("metering unreachable; lease %s kept (maintenance returns it later)", lease.lease_id)
            self._leases.setdefault(key, []).append(lease)
        except Exception:
            log.exception("returning lease %s failed; kept for maintenance", lease.lease_id)
            self._leases.setdefault(key, []).append(lease)

    def _drop(self, key: tuple[str, str], lease: _Lease) -> None:
        leases = self._leases.get(key)
        if leases and lease in leases:
            leases.remove(lease)

    async def _hand_back(self, ctx: TenantContext, leases: list[_Lease]) -> None:
        """Return a suspended tenant's idle leases with the platform key, so its budget is not held
        here while it cannot call; without that key they expire at metering instead."""
        if self._platform is None:
            return
        for lease in list(leases):
            if lease.held or lease not in leases:  # a call still in flight settles first
                continue
            leases.remove(lease)
            try:
                with self._releasing(ctx.tenant_id, lease):
                    await self._platform.release_for(ctx, lease.lease_id, self._reportable(lease))
            except LeaseGone:
                log.warning("suspended tenant's lease %s expired or settled at metering; dropped", lease.lease_id)
            except BackendUnavailable:
                log.warning("metering unreachable; suspended tenant's lease %s kept", lease.lease_id)
                leases.append(lease)
            except Exception:
                log.exception("returning suspended tenant's lease %s failed", lease.lease_id)
                leases.append(lease)

    async def close(self) -> None:
        """Return every lease with its final spend (shutdown)."""
        if self._returning:
            await asyncio.gather(*self._returning, return_exceptions=True)
        self._idle_release = -1.0
        await self.maintain()

    def _usable(self, key: tuple[str, str]) -> list[_Lease]:
        """Leases with room that will not expire under a call."""
        now = self._clock()
        return [lease for lease in self._leases.get(key, ()) if lease.available > 0 and lease.expires_at > now + 1.0]

    def _room(self, key: tuple[str, str]) -> int:
        """Free room in this replica's usable leases."""
        return sum(lease.available for lease in self._usable(key))

    def _take(self, key: tuple[str, str], amount: int) -> Hold | None:
        usable = self._usable(key)
        if sum(lease.available for lease in usable) < amount:
            return None
        now, rest, parts = self._clock(), amount, []
        for lease in usable:
            part = min(rest, lease.available)
            lease.held += part
            lease.last_used = now
            parts.append((lease, part))
            rest -= part
            if rest == 0:
                break
        return Hold(key, parts, amount)

    async def _release_spent(self, key: tuple[str, str]) -> None:
        """Return leases that cannot hold another call, so their rest is free for other replicas."""
        leases = self._leases.get(key, [])
        for lease in list(leases):
            if lease.held == 0 and lease in leases:
                leases.remove(lease)  # before the await: no call may take from a lease being returned
                try:
                    with self._releasing(key[0], lease):
                        await self._backend.release(lease.lease_id, self._reportable(lease))
                except LeaseGone:
                    log.warning("lease %s expired or settled at metering before its release; dropped", lease.lease_id)
                except BackendUnavailable:
                    self._leases.setdefault(key, []).append(lease)

    @staticmethod
    def _in_flight(lease: _Lease) -> int:
        """What the lease's calls in flight hold, within what is left of the grant (metering caps there too)."""
        return max(0, min(lease.held, lease.granted - lease.spent.total))

    @staticmethod
    def _reportable(lease: _Lease) -> Tokens:
        """Spend to report, never above the grant (metering refuses more; the excess was logged)."""
        spent = lease.spent
        over = spent.total - lease.granted
        if over <= 0:
            return spent
        capped = Tokens(spent.input, spent.output, spent.cache_write, spent.cache_read)
        for name in ("output", "input", "cache_read", "cache_write"):
            cut = min(over, getattr(capped, name))
            setattr(capped, name, getattr(capped, name) - cut)
            over -= cut
        return capped


def _split(used: Tokens, caps: list[int]) -> list[Tokens]:
    """Usage split over a hold's parts: each part up to its amount, in order; any excess to the last."""
    left = {"input": used.input, "output": used.output, "cache_write": used.cache_write, "cache_read": used.cache_read}
    shares = []
    for n, cap in enumerate(caps):
        share = Tokens()
        for name in left:
            take = left[name] if n == len(caps) - 1 else min(cap, left[name])
            setattr(share, name, take)
            left[name] -= take
            cap -= take
        shares.append(share)
    return shares

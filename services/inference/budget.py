"""Budget leases: a replica holds slices of a tenant's budget and spends them locally.

Metering grants leases atomically, so the leases of all replicas never add up to more than
the budget; this module makes sure a replica never spends more than it holds. Each call
holds its worst case (input estimate + max_tokens) before the upstream request and settles
its real usage after. No grpc imports: metering is reached through a BudgetBackend.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from shared.tenancy import TenantContext, tenant_scope

log = logging.getLogger("bulkhead.inference.budget")


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


class BudgetBackend(Protocol):
    """Metering's lease RPCs, called with the tenant's context bound."""

    async def lease(self, model: str, tokens: int, min_tokens: int) -> Grant: ...

    async def renew(self, lease_id: str, spent: Tokens) -> None: ...

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
    spent: Tokens = field(default_factory=Tokens)
    held: int = 0
    reported: int = 0
    last_used: float = 0.0

    @property
    def available(self) -> int:
        return self.granted - self.spent.total - self.held


@dataclass
class Hold:
    """Budget held for one call; settle it exactly once."""

    key: tuple[str, str]
    lease: _Lease
    amount: int
    settled: bool = False


class BudgetLeases:
    """Leases per (tenant, model) on this replica; the hot path makes no RPC while a lease has room."""

    def __init__(self, backend: BudgetBackend, *, slice_tokens: int = 20_000, ttl: float = 60.0,
                 idle_release: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 platform: PlatformLeases | None = None, suspended: Callable[[str], bool] = _never):
        """platform and suspended: how a suspended tenant's leases go back (its own token is refused)."""
        self._backend = backend
        self._platform = platform
        self._suspended = suspended
        self._slice = slice_tokens
        self._ttl = ttl
        self._idle_release = idle_release
        self._clock = clock
        self._leases: dict[tuple[str, str], list[_Lease]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._contexts: dict[str, TenantContext] = {}

    async def hold(self, ctx: TenantContext, model: str, amount: int) -> Hold:
        """Hold `amount` tokens of the tenant's budget for one call (BudgetRefused / BackendUnavailable)."""
        key = (ctx.tenant_id, model)
        self._contexts[ctx.tenant_id] = ctx
        held = self._take(key, amount)
        if held is not None:
            return held
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            held = self._take(key, amount)          # another call may have leased meanwhile
            if held is not None:
                return held
            await self._release_spent(key)
            grant = await self._backend.lease(model, max(amount, self._slice), amount)
            lease = _Lease(grant.lease_id, grant.tokens, self._clock() + grant.ttl)
            self._leases.setdefault(key, []).append(lease)
            held = self._take(key, amount)
            if held is None:                        # granted less than min_tokens: metering broke its promise
                raise BudgetRefused("budget lease too small", [("budget", "lease smaller than the call")], None)
            return held

    def settle(self, hold: Hold, used: Tokens) -> None:
        """Charge the call's real usage to its lease and free the rest of the hold."""
        if hold.settled:
            return
        hold.settled = True
        hold.lease.held -= hold.amount
        hold.lease.spent.add(used)
        if used.total > hold.amount:
            log.warning("call used %d tokens, more than the %d held", used.total, hold.amount)

    def release_unused(self, hold: Hold) -> None:
        """Free a hold whose call never reached the upstream."""
        self.settle(hold, Tokens())

    def held_tokens(self, tenant_id: str) -> int:
        """Tokens this replica holds in leases for a tenant (granted, any model)."""
        return sum(l.granted for (t, _), ls in self._leases.items() if t == tenant_id for l in ls)

    async def maintain(self) -> None:
        """Renew leases near expiry, report spend, and return idle or spent leases (run periodically)."""
        now = self._clock()
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
                try:
                    with tenant_scope(ctx):
                        if idle or (lease.held == 0 and lease.available <= 0):
                            await self._backend.release(lease.lease_id, self._reportable(lease))
                            leases.remove(lease)
                        elif lease.expires_at - now < self._ttl / 2 or lease.spent.total != lease.reported:
                            await self._backend.renew(lease.lease_id, self._reportable(lease))
                            lease.reported = lease.spent.total
                            lease.expires_at = now + self._ttl
                except BackendUnavailable:
                    log.warning("metering unreachable; lease %s kept", lease.lease_id)
                except Exception:
                    log.exception("lease %s maintenance failed", lease.lease_id)
            if not leases:
                self._leases.pop(key, None)

    async def _hand_back(self, ctx: TenantContext, leases: list[_Lease]) -> None:
        """Return a suspended tenant's idle leases with the platform key, so its budget is not held
        here while it cannot call; without that key they expire at metering instead."""
        if self._platform is None:
            return
        for lease in list(leases):
            if lease.held:  # a call still in flight settles first
                continue
            try:
                await self._platform.release_for(ctx, lease.lease_id, self._reportable(lease))
            except BackendUnavailable:
                log.warning("metering unreachable; suspended tenant's lease %s kept", lease.lease_id)
                continue
            except Exception:
                log.exception("returning suspended tenant's lease %s failed", lease.lease_id)
                continue
            leases.remove(lease)

    async def close(self) -> None:
        """Return every lease with its final spend (shutdown)."""
        self._idle_release = -1.0
        await self.maintain()

    def _take(self, key: tuple[str, str], amount: int) -> Hold | None:
        now = self._clock()
        for lease in self._leases.get(key, ()):
            if lease.available >= amount and lease.expires_at > now + 1.0:
                lease.held += amount
                lease.last_used = now
                return Hold(key, lease, amount)
        return None

    async def _release_spent(self, key: tuple[str, str]) -> None:
        """Return leases that cannot hold another call, so their rest is free for other replicas."""
        for lease in list(self._leases.get(key, ())):
            if lease.held == 0:
                try:
                    await self._backend.release(lease.lease_id, self._reportable(lease))
                except BackendUnavailable:
                    continue
                self._leases[key].remove(lease)

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

"""Rate limits applied before any upstream call: requests/min, tokens/min, calls in flight.

The limits themselves are metering's Quota (looked up per tenant); this module only counts.
Buckets are per replica, so N replicas admit up to N times a tenant's rate: budgets, not
rates, are the exact cross-replica guarantee.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """A tenant's rate limits; 0 means unlimited."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    concurrent_calls: int = 0


class Rejected(Exception):
    """A limit refused the call; `violations` are (subject, description), `retry_after` in seconds."""

    def __init__(self, message: str, violations: list[tuple[str, str]], retry_after: float):
        super().__init__(message)
        self.violations = violations
        self.retry_after = retry_after


class TokenBucket:
    """Holds up to `per_minute` units and refills at per_minute/60 per second."""

    def __init__(self, per_minute: int, clock: Callable[[], float]):
        self.per_minute = per_minute
        self._clock = clock
        self._level = float(per_minute)
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.per_minute, self._level + (now - self._at) * self.per_minute / 60.0)
        self._at = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` could be taken (0 when it can be now)."""
        self._refill()
        if amount <= self._level:
            return 0.0
        if amount > self.per_minute:
            return 60.0
        return (amount - self._level) * 60.0 / self.per_minute

    def take(self, amount: float) -> None:
        """Take `amount` (may go negative when settling a call that used more than estimated)."""
        self._refill()
        self._level -= amount

    def give(self, amount: float) -> None:
        """Return part of what was taken (a call used less than it reserved)."""
        self._refill()
        self._level = min(self.per_minute, self._level + amount)


class _TenantState:
    def __init__(self) -> None:
        self.requests: TokenBucket | None = None
        self.tokens: TokenBucket | None = None
        self.in_flight = 0


class Admission:
    """What one admitted call holds; `settle` once with the real token count."""

    def __init__(self, limiter: RateLimiter, tenant_id: str, tokens: int):
        self._limiter = limiter
        self._tenant_id = tenant_id
        self._tokens = tokens
        self._done = False

    def settle(self, used_tokens: int | None) -> None:
        """Release the concurrency slot and correct the token bucket by the real usage."""
        if self._done:
            return
        self._done = True
        state = self._limiter._tenants[self._tenant_id]
        state.in_flight -= 1
        if state.tokens is not None and used_tokens is not None:
            delta = self._tokens - used_tokens
            if delta > 0:
                state.tokens.give(delta)
            else:
                state.tokens.take(-delta)


class RateLimiter:
    """Per-tenant requests/min and tokens/min buckets and an in-flight cap."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._tenants: dict[str, _TenantState] = {}

    def admit(self, tenant_id: str, limits: Limits, tokens: int) -> Admission:
        """Admit one call worth `tokens` (estimate) or raise Rejected with every limit it breaks."""
        state = self._tenants.setdefault(tenant_id, _TenantState())
        state.requests = self._bucket(state.requests, limits.requests_per_minute)
        state.tokens = self._bucket(state.tokens, limits.tokens_per_minute)
        violations: list[tuple[str, str]] = []
        waits: list[float] = []
        if limits.concurrent_calls and state.in_flight >= limits.concurrent_calls:
            violations.append(("concurrent_calls", f"{limits.concurrent_calls} calls already in flight"))
            waits.append(0.1)
        if state.requests is not None and (w := state.requests.wait_for(1)) > 0:
            violations.append(("requests_per_minute", f"limit of {limits.requests_per_minute} requests/min reached"))
            waits.append(w)
        if state.tokens is not None and (w := state.tokens.wait_for(tokens)) > 0:
            violations.append(("tokens_per_minute", f"limit of {limits.tokens_per_minute} tokens/min reached"))
            waits.append(w)
        if violations:
            raise Rejected(
                "rate limit reached: " + "; ".join(d for _, d in violations), violations, round(max(waits), 3)
            )
        if state.requests is not None:
            state.requests.take(1)
        if state.tokens is not None:
            state.tokens.take(tokens)
        state.in_flight += 1
        return Admission(self, tenant_id, tokens)

    def in_flight(self, tenant_id: str) -> int:
        """Calls of this tenant in flight on this replica."""
        state = self._tenants.get(tenant_id)
        return state.in_flight if state else 0

    def _bucket(self, bucket: TokenBucket | None, per_minute: int) -> TokenBucket | None:
        if not per_minute:
            return None
        if bucket is None or bucket.per_minute != per_minute:
            return TokenBucket(per_minute, self._clock)
        return bucket

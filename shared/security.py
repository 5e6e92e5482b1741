"""Denials are security events: counted per tenant and reason, logged without the token, and (when a
service serves the security-events contract) aggregated for its ledger with a bounded number of writes.

A refusal is attributed to a tenant only when the token's signature verified: a wrong x-tenant-id,
a missing scope, a revoked token, or an expired one issued within the longest token lifetime. A
garbage token names nobody and stays in metrics and logs. Attributed refusals are summed in memory
per (tenant, minute, method, reason, principal); every flush hands the sums to the ledger and starts
again. At most `max_keys` distinct keys (and `max_keys_per_tenant` of one tenant) are kept between two
flushes; refusals beyond that are counted in `bulkhead_security_events_overflow_total`, not stored, so
a flood of refusals is a flood of counter increments, never of database writes.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from prometheus_client import Counter as PromCounter

from shared.metrics import tenant_label

log = logging.getLogger("bulkhead.security")

DENIALS = PromCounter(
    "bulkhead_security_denials_total", "Requests refused by the tenancy interceptor", ["service", "tenant", "reason"]
)
OVERFLOW = PromCounter(
    "bulkhead_security_events_overflow_total",
    "Attributed refusals counted but not stored: the flush interval's key budget was spent",
    ["service"],
)
DROPPED = PromCounter(
    "bulkhead_security_events_dropped_total",
    "Aggregated refusals a failed flush could not keep for the next one",
    ["service"],
)

MAX_KEYS = 500
"""Distinct keys written per flush at most, per replica: with the default 5 s interval, 100 rows/s."""
MAX_KEYS_PER_TENANT = 100
"""Of those, at most this many for one tenant, so one tenant's flood cannot crowd out the others'."""
EXPIRED_ATTRIBUTED_S = 3600
"""An expired token counts for its tenant only if issued this recently (identity's longest token
lifetime): a deleted tenant's old tokens then never write rows after its purge."""
NOT_STORED = frozenset({"TENANT_SUSPENDED"})
"""Reasons kept out of the ledger: a suspended or deleting tenant's rows are about to be purged."""


class EventKey(NamedTuple):
    """What one ledger row counts."""

    tenant_id: str
    bucket_start: int
    method: str
    reason: str
    principal_id: str


@dataclass(frozen=True, slots=True)  # not a NamedTuple: its `count` field would shadow tuple.count
class Pending:
    """An aggregated key between two flushes."""

    key: EventKey
    count: int
    last_seen_us: int


Sink = Callable[[Sequence[Pending]], Awaitable[None]]


class SecurityEvents:
    """Records every refusal so a principal probing outside its tenant shows up."""

    def __init__(
        self,
        service: str,
        *,
        suspended: Callable[[str], bool] | None = None,
        max_keys: int = MAX_KEYS,
        max_keys_per_tenant: int = MAX_KEYS_PER_TENANT,
        clock: Callable[[], float] = time.time,
    ):
        self.service = service
        self.counts: Counter[tuple[str, str]] = Counter()
        """(tenant, reason) -> denials since start; tenant is the token's, or "unauthenticated"."""
        self.suspended = suspended or (lambda _tenant: False)
        """Whether a tenant's tokens are refused now (its rows are not written: it may be being deleted)."""
        self.max_keys = max_keys
        self.max_keys_per_tenant = max_keys_per_tenant
        self.overflow = 0
        """Attributed refusals not stored since start (the key budget of their interval was spent)."""
        self._clock = clock
        self._sink: Sink | None = None
        self._pending: dict[EventKey, list[int]] = {}
        self._per_tenant: Counter[str] = Counter()

    def attach(self, sink: Sink) -> None:
        """Aggregate attributed refusals for `sink` (the ledger), which flush() feeds."""
        self._sink = sink

    @property
    def pending(self) -> int:
        """Distinct keys waiting for the next flush."""
        return len(self._pending)

    def denied(
        self,
        *,
        reason: str,
        method: str,
        peer: str,
        tenant_id: str | None,
        principal_id: str | None,
        claimed_tenant: str | None,
        message: str,
    ) -> None:
        """Count and log one refusal. Never pass the token here.

        tenant_id is the verified token's tenant, or None when no signature verified.
        """
        tenant = tenant_id or "unauthenticated"
        self.counts[(tenant, reason)] += 1
        DENIALS.labels(self.service, tenant_label(tenant), reason).inc()
        log.warning(
            "request denied: %s",
            message,
            extra={
                "event": "security.denied",
                "reason": reason,
                "method": method,
                "peer": peer,
                "tenant_id": tenant,
                "principal_id": principal_id or "",
                "claimed_tenant": claimed_tenant or "",
            },
        )
        if self._sink is not None and tenant_id and reason not in NOT_STORED and not self.suspended(tenant_id):
            self._add(tenant_id, method, reason, principal_id or "")

    def _add(self, tenant_id: str, method: str, reason: str, principal_id: str) -> None:
        now = self._clock()
        key = EventKey(tenant_id, int(now // 60) * 60, method, reason, principal_id)
        seen = self._pending.get(key)
        if seen is None:
            if len(self._pending) >= self.max_keys or self._per_tenant[tenant_id] >= self.max_keys_per_tenant:
                self.overflow += 1
                OVERFLOW.labels(self.service).inc()
                return
            self._pending[key] = [1, int(now * 1_000_000)]
            self._per_tenant[tenant_id] += 1
            return
        seen[0] += 1
        seen[1] = int(now * 1_000_000)

    async def flush(self) -> int:
        """Hand the sums gathered since the last flush to the ledger; how many keys went.

        A failed write keeps them for the next flush (within the same key budget); a tenant that is
        suspended or being deleted by now is left out.
        """
        if self._sink is None or not self._pending:
            return 0
        batch, self._pending, self._per_tenant = self._pending, {}, Counter()
        out = [Pending(k, c, seen) for k, (c, seen) in batch.items() if not self.suspended(k.tenant_id)]
        try:
            await self._sink(out)
        except BaseException:
            self._put_back(out)
            raise
        return len(out)

    def _put_back(self, items: Sequence[Pending]) -> None:
        for item in items:
            key = item.key
            seen = self._pending.get(key)
            if seen is not None:
                seen[0] += item.count
                seen[1] = max(seen[1], item.last_seen_us)
            elif len(self._pending) < self.max_keys and self._per_tenant[key.tenant_id] < self.max_keys_per_tenant:
                self._pending[key] = [item.count, item.last_seen_us]
                self._per_tenant[key.tenant_id] += 1
            else:
                DROPPED.labels(self.service).inc(item.count)

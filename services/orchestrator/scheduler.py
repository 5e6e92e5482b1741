"""Fair admission: which queued runs start next, under per-tenant and global concurrency limits.

Pure and deterministic so it can be tested without a database: the dispatcher feeds it the
queue and the running counts it reads, and claims what it returns.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class QueuedRun:
    """A run waiting for a slot."""

    tenant_id: str
    """Its tenant."""
    run_id: str
    """Its id."""
    enqueued_at: float
    """When it was queued (FIFO within a tenant)."""


def pick_runs(
    queued: Iterable[QueuedRun], running: Mapping[str, int], *, per_tenant_limit: int, free_slots: int
) -> list[QueuedRun]:
    """The runs to start now, in start order.

    Each pick goes to the tenant with the fewest running runs (ties: the oldest waiting run),
    so a tenant with a long queue gets one slot at a time like everyone else and cannot
    starve the others; within a tenant, runs start in the order they were queued.
    """
    by_tenant: dict[str, list[QueuedRun]] = defaultdict(list)
    for q in sorted(queued, key=lambda q: (q.enqueued_at, q.run_id)):
        by_tenant[q.tenant_id].append(q)
    active: Counter[str] = Counter({t: n for t, n in running.items()})
    picked: list[QueuedRun] = []
    while len(picked) < free_slots:
        eligible = [t for t, runs in by_tenant.items() if runs and active[t] < per_tenant_limit]
        if not eligible:
            break
        tenant = min(eligible, key=lambda t: (active[t], by_tenant[t][0].enqueued_at, t))
        picked.append(by_tenant[tenant].pop(0))
        active[tenant] += 1
    return picked

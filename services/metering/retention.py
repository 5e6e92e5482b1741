"""Retention of per-event usage detail (shared.retention): a tenant's usage events older than its
usage_detail_days are deleted, whole hours at a time, while the hourly roll-up (metering_usage_hours)
that every report and chargeback reads for whole hours is kept. So a day's or a month's totals, and
chargeback, are the same before and after pruning.

Kept in full: the events of (model, hour) pairs in which a price version starts after the hour did,
because only the events say which price each token had there. Reports over pruned hours read the
roll-up (rollup._sum_pruned); a window edge inside a pruned hour counts the hour when its start is in
the window. Idempotent and safe in every replica: each batch deletes what is still there, and the
tenant's horizon (metering_usage_retention) only moves forward.
"""

from __future__ import annotations

import logging

from services.metering import periods, rollup
from services.metering.prices import PriceCache
from shared.db import Database
from shared.db.raw import RawTransaction, raw_transaction
from shared.retention import BATCH, Policy

log = logging.getLogger("bulkhead.metering.retention")

_H = periods.US_PER_HOUR


class UsageDetailRetention:
    """The metering sweeper's usage step: prune(policy, now_us)."""

    def __init__(self, db: Database, prices: PriceCache) -> None:
        self._db = db
        self._prices = prices

    async def prune(self, policy: Policy, now_us: int, *, batch: int = BATCH) -> int:
        """Delete the tenant's events of whole hours before its usage cutoff, `batch` per transaction;
        returns how many."""
        route = await self._db.router.existing(policy.tenant_id, policy.tier)
        if route is None:
            return 0
        before_hour = policy.usage_cutoff_us(now_us) // _H
        split = sorted(rollup.split_hours((await self._prices.book(fresh=True)).versions()))
        total = 0
        while True:
            async with raw_transaction(route.bind, tenant_id=policy.tenant_id, schema=route.schema, write=True) as tx:
                deleted = await _delete_batch(tx, policy.tenant_id, before_hour, split, batch)
                if deleted:
                    await _move_horizon(tx, policy.tenant_id, before_hour, deleted)
            total += deleted
            if deleted < batch:
                break
        if total:
            log.info(
                "retention pruned %d usage events of tenant %s before hour %d", total, policy.tenant_id, before_hour
            )
        return total


async def _delete_batch(
    tx: RawTransaction, tenant_id: str, before_hour: int, split: list[tuple[str, int]], batch: int
) -> int:
    args: list[object] = [tenant_id, before_hour, batch]
    keep = ""
    pairs = [(m, h) for m, h in split if h < before_hour]
    if pairs:
        conds = []
        for model, hour in pairs:
            args += [model, hour]
            conds.append(f"(model = ${len(args) - 1} AND hour = ${len(args)})")
        keep = f" AND NOT ({' OR '.join(conds)})"
    # Oldest first through the (tenant, occurred_us) index; hours are whole, so occurred_us < edge.
    chosen = (
        f"SELECT idempotency_key FROM metering_usage_events WHERE tenant_id = $1 AND hour < $2{keep} "
        "ORDER BY occurred_us LIMIT $3"
    )
    return await tx.execute(
        f"DELETE FROM metering_usage_events WHERE tenant_id = $1 AND idempotency_key IN ({chosen})", *args
    )


async def _move_horizon(tx: RawTransaction, tenant_id: str, before_hour: int, deleted: int) -> None:
    await tx.execute(
        "INSERT INTO metering_usage_retention (tenant_id, pruned_before_hour, pruned_events) "
        "VALUES ($1, $2, $3) ON CONFLICT (tenant_id) DO UPDATE SET "
        "pruned_before_hour = CASE WHEN metering_usage_retention.pruned_before_hour > excluded.pruned_before_hour "
        "THEN metering_usage_retention.pruned_before_hour ELSE excluded.pruned_before_hour END, "
        "pruned_events = metering_usage_retention.pruned_events + excluded.pruned_events",
        tenant_id,
        before_hour,
        deleted,
    )

"""Retention of per-event usage detail (services/metering/retention.py): a tenant's events older than
its usage_detail_days are pruned whole hours at a time, the hourly roll-up stays, and every report over
whole hours (totals by model, agent, principal, day, hour) and chargeback (days, months) is exactly what
it was before. Events of hours in which a price version starts are kept so those hours stay priced event
by event. Another tenant with a long retention keeps everything. SQLite and Postgres; pooled, bridge, silo."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest
from prometheus_client import CollectorRegistry

from services.metering import periods
from services.metering.ledger import UsageLedger
from services.metering.meters import MeteringMetrics
from services.metering.prices import PriceCache
from services.metering.pricing import Price, Tokens
from services.metering.retention import UsageDetailRetention
from services.metering.server import MIGRATIONS
from services.metering.usage import (
    AGENT,
    DAY,
    HOUR,
    MODEL,
    PRINCIPAL,
    UsageQuery,
    UsageRecord,
)
from shared.db import Database
from shared.db.raw import raw_transaction
from shared.retention import Policy
from shared.tenancy import TenantContext, tenant_scope
from testkit.dialects import DIALECTS, open_migrated

H, D = periods.US_PER_HOUR, periods.US_PER_DAY
NOW = (periods.now_us() // H) * H + 25 * 60 * 1_000_000  # 25 minutes into the current hour
MID_HOUR_PRICE = NOW - 5 * D - 7 * H + 17 * 60 * 1_000_000  # a version that starts 17 minutes into an hour


@pytest.fixture(params=DIALECTS)
async def db(request, tmp_path):
    database = await open_migrated(request, tmp_path, MIGRATIONS, "met_ret")
    yield database
    await database.close()


def _ctx(tid: str, tier: str) -> TenantContext:
    return TenantContext(tenant_id=tid, principal_id="p_caller", scopes=frozenset({"*"}), tier=tier)


def _records(rng: random.Random, prefix: str, n: int) -> list[UsageRecord]:
    """Events over the last 10 days, some of them in the hour the mid-hour price version splits."""
    out = []
    for i in range(n):
        at = NOW - rng.randint(0, 10 * D) if i % 10 else MID_HOUR_PRICE - 17 * 60 * 1_000_000 + rng.randint(0, H - 1)
        out.append(
            UsageRecord(
                f"{prefix}{i}",
                rng.choice(["m-a", "m-b"]),
                at,
                Tokens(rng.randint(0, 5000), rng.randint(0, 900), rng.randint(0, 50), rng.randint(0, 50)),
                principal_id=rng.choice(["", "p_1"]),
                agent_id=rng.choice(["", "triage"]),
                outcome=rng.choice([1, 1, 2]),
            )
        )
    return out


def _queries() -> list[UsageQuery]:
    start = (NOW // D - 12) * D
    whole = [
        UsageQuery(start, NOW + H),
        UsageQuery(start, NOW + H, (MODEL, DAY)),
        UsageQuery(start, NOW + H, (MODEL, HOUR)),
        UsageQuery(start, NOW + H, (AGENT, PRINCIPAL)),
        UsageQuery(start, NOW + H, (MODEL,), model="m-a"),
        UsageQuery(NOW // H * H - 6 * D - 3 * H, NOW // H * H - 2 * D, (MODEL, AGENT, HOUR)),
        UsageQuery(start + 2 * D, start + 9 * D, (PRINCIPAL, DAY), agent_id="triage"),
    ]
    return whole


async def _answers(ledger: UsageLedger, ctx: TenantContext):
    with tenant_scope(ctx):
        reports = [await ledger.query(q) for q in _queries()]
        start = (NOW // D - 12) * D
        bills = [
            await ledger.chargeback(start, NOW + D, periods.DAY),
            await ledger.chargeback(start - 40 * D, NOW + D, periods.MONTH),
        ]
    return reports, bills


async def _event_hours(db: Database, ctx: TenantContext) -> list[int]:
    route = await db.router.existing(ctx.tenant_id, ctx.tier)
    async with raw_transaction(route.bind, tenant_id=ctx.tenant_id, schema=route.schema) as tx:
        return sorted(
            int(r[0])
            for r in await tx.fetch("SELECT hour FROM metering_usage_events WHERE tenant_id = $1", ctx.tenant_id)
        )


@pytest.mark.parametrize("tier", ["pooled", "bridge", "silo"])
async def test_pruning_detail_keeps_totals_and_chargeback_exact(db, tier):
    rng = random.Random(13)
    prices = PriceCache(db, max_age_us=0)
    ledger = UsageLedger(db, prices, MeteringMetrics(CollectorRegistry()))
    await prices.set(Price("m-a", NOW - 30 * D, 3_000_000, 15_000_000, 1, 2))
    await prices.set(Price("m-b", NOW - 30 * D, 1_000_000, 5_000_000, 1, 1))
    await prices.set(Price("m-a", MID_HOUR_PRICE, 4_000_000, 16_000_000, 1, 2))  # splits its hour
    await prices.set(Price("m-b", NOW - 3 * D - 5 * H, 2_000_000, 6_000_000, 1, 1))  # on the hour
    short, long_ = _ctx(f"t_s{uuid.uuid4().hex[:8]}", tier), _ctx(f"t_l{uuid.uuid4().hex[:8]}", tier)
    for ctx in (short, long_):
        with tenant_scope(ctx):
            await ledger.record(_records(rng, "k", 600))
    before = {ctx.tenant_id: await _answers(ledger, ctx) for ctx in (short, long_)}
    hours_before = {ctx.tenant_id: await _event_hours(db, ctx) for ctx in (short, long_)}

    retention = UsageDetailRetention(db, prices)
    policies = [Policy(short.tenant_id, tier, usage_detail_days=1), Policy(long_.tenant_id, tier, usage_detail_days=30)]
    pruned = [await retention.prune(p, NOW, batch=97) for p in policies]
    cutoff_hour = (NOW - D) // H
    split_hour = MID_HOUR_PRICE // H
    old = [h for h in hours_before[short.tenant_id] if h < cutoff_hour]
    kept_split = [h for h in old if h == split_hour]
    assert kept_split and pruned[1] == 0
    after_hours = await _event_hours(db, short)
    still_old = [h for h in after_hours if h < cutoff_hour]
    assert pruned[0] == len(old) - len(still_old) > 400
    assert 0 < len(still_old) < len(kept_split)  # m-a's events of the split hour stay; m-b's there go
    assert all(h >= cutoff_hour or h == split_hour for h in after_hours)
    assert [h for h in after_hours if h >= cutoff_hour] == [
        h for h in hours_before[short.tenant_id] if h >= cutoff_hour
    ]
    assert await _event_hours(db, long_) == hours_before[long_.tenant_id]

    for ctx in (short, long_):
        assert await _answers(ledger, ctx) == before[ctx.tenant_id]
    assert [await retention.prune(p, NOW) for p in policies] == [0, 0]  # a repeat does nothing


async def test_a_window_edge_inside_a_pruned_hour_counts_whole_hours_by_their_start(db):
    """Pruned hours are known per hour only: an hour counts in a window when its start does."""
    prices = PriceCache(db, max_age_us=0)
    ledger = UsageLedger(db, prices, MeteringMetrics(CollectorRegistry()))
    ctx = _ctx(f"t_{uuid.uuid4().hex[:8]}", "pooled")
    hour = (NOW - 3 * D) // H * H
    with tenant_scope(ctx):
        await ledger.record(
            [
                UsageRecord("a", "m-a", hour + 10, Tokens(1, 0)),
                UsageRecord("b", "m-a", hour + H // 2, Tokens(10, 0)),
                UsageRecord("c", "m-a", hour + H + 5, Tokens(100, 0)),
            ]
        )
        inside = UsageQuery(hour + H // 4, hour + 2 * H)
        assert (await ledger.query(inside))[0].tokens.input == 110  # event detail: b and c
        assert (
            await UsageDetailRetention(db, prices).prune(Policy(ctx.tenant_id, "pooled", usage_detail_days=1), NOW) == 3
        )
        assert (await ledger.query(inside))[0].tokens.input == 100  # hour granular: only c's hour starts inside
        assert (await ledger.query(UsageQuery(hour, hour + 2 * H)))[0].tokens.input == 111


async def test_concurrent_sweepers_and_a_late_event_keep_totals(db):
    """Three replicas prune at once (each event once); an event recorded late into a pruned hour counts."""
    rng = random.Random(5)
    prices = PriceCache(db, max_age_us=0)
    ledger = UsageLedger(db, prices, MeteringMetrics(CollectorRegistry()))
    await prices.set(Price("m-a", NOW - 30 * D, 3_000_000, 15_000_000, 1, 2))
    await prices.set(Price("m-a", MID_HOUR_PRICE, 4_000_000, 16_000_000, 1, 2))
    ctx = _ctx(f"t_{uuid.uuid4().hex[:8]}", "pooled")
    with tenant_scope(ctx):
        await ledger.record(_records(rng, "k", 500))
    before = await _answers(ledger, ctx)
    retention = UsageDetailRetention(db, prices)
    policy = Policy(ctx.tenant_id, "pooled", usage_detail_days=2)
    counts = await asyncio.gather(*(retention.prune(policy, NOW, batch=50) for _ in range(3)))
    old = [h for h in await _event_hours(db, ctx) if h < (NOW - 2 * D) // H]
    assert sum(counts) > 300 and all(h == MID_HOUR_PRICE // H for h in old)
    assert await _answers(ledger, ctx) == before

    late = UsageRecord("late-1", "m-a", NOW - 8 * D + 5, Tokens(1000, 100))
    split_late = UsageRecord("late-2", "m-a", MID_HOUR_PRICE + 5, Tokens(2000, 200))
    with tenant_scope(ctx):
        await ledger.record([late, split_late])
        whole = UsageQuery((NOW // D - 12) * D, NOW + H)
        (row,) = await ledger.query(whole)
    (was,) = before[0][0]
    assert row.event_count == was.event_count + 2
    assert row.tokens.input == was.tokens.input + 3000

"""The hourly roll-up answers usage queries exactly as the events do, and only where it can."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import func, make_url, select, update

from services.metering import periods, store
from services.metering.ledger import UsageLedger
from services.metering.meters import MeteringMetrics
from services.metering.prices import PriceCache
from services.metering.pricing import Price, Tokens
from services.metering.server import MIGRATIONS
from services.metering.usage import AGENT, DAY, HOUR, MODEL, PRINCIPAL, UsageQuery, UsageRecord, total
from shared.db import Database
from shared.db.migrations import upgrade
from shared.tenancy import TenantContext, tenant_scope
from testkit.dialects import DIALECTS, open_migrated

from .helpers import T0

H = periods.US_PER_HOUR
MODELS = ("m-a", "m-b")


@pytest.fixture(params=DIALECTS)
async def db(request, tmp_path):
    """The metering database on each backend, migrated."""
    database = await open_migrated(request, tmp_path, MIGRATIONS, "met_rollup")
    yield database
    await database.close()


def _ctx(tid: str) -> TenantContext:
    return TenantContext(tenant_id=tid, principal_id="p_caller", scopes=frozenset({"*"}), tier="pooled")


async def _from_events(db: Database, prices: PriceCache, query: UsageQuery, tid: str):
    """The answer summed straight from the events (the reference)."""
    book = await prices.book(fresh=True)
    async with db.session() as s:
        partials = await store.sum_usage(s, query, book.versions())
    return total(partials, tenant_id=tid, group_by=query.group_by, book=book)


def _record(rng: random.Random, key: str) -> UsageRecord:
    at = T0 + rng.randint(-36 * H, 36 * H)
    return UsageRecord(
        key,
        rng.choice(MODELS),
        at,
        Tokens(rng.randint(0, 5000), rng.randint(0, 900), rng.randint(0, 50), rng.randint(0, 50)),
        principal_id=rng.choice(["", "p_1", "p_2"]),
        agent_id=rng.choice(["", "triage", "billing"]),
        outcome=rng.choice([1, 1, 1, 2, 3]),
    )


def _query(rng: random.Random) -> UsageQuery:
    start = T0 + rng.randint(-40, 38) * H + rng.choice([0, 0, rng.randint(1, H - 1)])
    end = start + rng.choice([rng.randint(1, H - 1), rng.randint(1, 80) * H, rng.randint(1, 80 * H)])
    group = rng.sample([MODEL, AGENT, PRINCIPAL], rng.randint(0, 3)) + rng.choice([[], [DAY], [HOUR]])
    return UsageQuery(
        start,
        end,
        tuple(group),
        model=rng.choice(["", "", "m-a"]),
        agent_id=rng.choice(["", "", "triage"]),
        principal_id=rng.choice(["", "", "p_caller"]),
    )


async def test_rollup_answer_equals_the_events_answer(db):
    """Random batches (repeats within and across batches, two tenants) and price versions set on and off the
    hour, back-dated and replaced: every random query's answer equals the events' answer."""
    rng = random.Random(2026)
    prices = PriceCache(db, max_age_us=0)
    ledger = UsageLedger(db, prices, MeteringMetrics(CollectorRegistry()))
    tenants = (f"t_a_{uuid.uuid4().hex[:6]}", f"t_b_{uuid.uuid4().hex[:6]}")
    await prices.set(Price("m-a", T0 - 100 * H, 3_000_000, 15_000_000, 1, 2))
    keys: list[str] = []
    compared = 0
    for round_ in range(8):
        if round_ % 2:  # a price change: mid-hour or on the hour, sometimes back-dated over recorded events
            at = T0 + rng.randint(-30, 30) * H + rng.choice([0, rng.randint(1, H - 1)])
            await prices.set(Price(rng.choice(MODELS), at, rng.randint(1, 9_000_000), rng.randint(1, 9_000_000), 3, 1))
        for tid in tenants:
            batch = [_record(rng, f"k{len(keys) + i}") for i in range(rng.randint(1, 300))]
            batch += [_record(rng, rng.choice(keys)) for _ in range(min(len(keys), 20))]  # already stored
            batch += batch[:5]  # repeated within the batch
            with tenant_scope(_ctx(tid)):
                await ledger.record(batch)
            keys += [r.idempotency_key for r in batch]
        for tid in tenants:
            with tenant_scope(_ctx(tid)):
                for _ in range(15):
                    q = _query(rng)
                    assert await ledger.query(q) == await _from_events(db, prices, q, tid), q
                    compared += 1
    assert compared == 8 * 2 * 15


async def test_whole_hours_come_from_the_rollup_and_partial_hours_from_the_events(db):
    """A window of whole hours reads the roll-up (a doctored hour row shows), a window inside an hour reads
    the events (it does not), and a repeated key is not added to the roll-up twice."""
    prices = PriceCache(db, max_age_us=0)
    ledger = UsageLedger(db, prices, MeteringMetrics(CollectorRegistry()))
    tid = f"t_{uuid.uuid4().hex[:6]}"
    hour = T0 - T0 % H
    with tenant_scope(_ctx(tid)):
        for _ in range(2):  # the second time every key is a repeat
            await ledger.record(
                [UsageRecord("k1", "m-a", hour + 10, Tokens(5, 1)), UsageRecord("k2", "m-a", hour + 20, Tokens(7, 1))]
            )
        whole, inside = UsageQuery(hour, hour + H), UsageQuery(hour + 1, hour + H)
        assert [r.event_count for r in await ledger.query(whole)] == [2]
        async with db.session() as s:
            await s.execute(update(store.UsageHourRow).values(event_count=store.UsageHourRow.event_count + 40))
        assert [r.event_count for r in await ledger.query(whole)] == [42]
        assert [r.event_count for r in await ledger.query(inside)] == [2]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def urls_at_0003(request, tmp_path):
    """(runtime url, owner url) of a metering database migrated to 0003, before the roll-up existed."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
        owner = url
        role = None
    else:
        urls = await request.getfixturevalue("postgres").create_database(f"met_backfill_{uuid.uuid4().hex[:6]}")
        url, owner, role = urls.app_url, urls.owner_url, make_url(str(urls.app_url)).username
    await asyncio.to_thread(upgrade, owner, MIGRATIONS, app_role=role, revision="0003")
    return url, owner, role


async def test_migration_backfills_the_rollup_from_stored_events(urls_at_0003):
    """Events stored before the roll-up existed are in it after the upgrade (under FORCE'd RLS on Postgres)."""
    url, owner, role = urls_at_0003
    rng, tid = random.Random(7), f"t_{uuid.uuid4().hex[:6]}"
    records = [_record(rng, f"k{i}") for i in range(400)]
    db = await Database.open(url)
    try:
        with tenant_scope(_ctx(tid)):
            async with db.raw(write=True) as tx:
                await store.insert_usage(tx, tid, records, T0, default_principal="p_caller")
    finally:
        await db.close()
    await asyncio.to_thread(upgrade, owner, MIGRATIONS, app_role=role)
    db = await Database.open(url)
    try:
        prices = PriceCache(db, max_age_us=0)
        await prices.set(Price("m-a", T0 - 100 * H + 17, 3_000_000, 15_000_000, 1, 2))
        ledger = UsageLedger(db, prices, MeteringMetrics(CollectorRegistry()))
        with tenant_scope(_ctx(tid)):
            async with db.session() as s:
                hours = (await s.execute(select(func.sum(store.UsageHourRow.event_count)))).scalar_one()
            assert hours == len(records)
            for group in ((), (HOUR, MODEL, AGENT, PRINCIPAL), (DAY,)):
                q = UsageQuery(T0 - 48 * H, T0 + 48 * H, group)
                assert await ledger.query(q) == await _from_events(db, prices, q, tid)
    finally:
        await db.close()

"""Usage detail retention seen through metering's RPCs: after the sweeper (the server's own steps)
prunes a tenant's old usage events, QueryUsage (by model, agent, principal, day, hour) and
ExportChargeback (days and months, every tenant) answer exactly as before; another tenant keeps its
events. SQLite and Postgres."""

from __future__ import annotations

import random
import uuid

import pytest

from bulkhead.metering.v1 import metering_pb2 as pb
from services.metering import periods
from services.metering.server import MIGRATIONS
from shared.db import Database
from shared.db.raw import raw_transaction
from shared.retention import Policy, RetentionSweeper
from tests.services.metering.conftest import start_harness
from tests.services.metering.helpers import T0, event, price, ts

H, D = periods.US_PER_HOUR, periods.US_PER_DAY
A, B = "t_alpha", "t_bravo"
G = pb.UsageGrouping


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def h(request, tmp_path):
    if request.param == "sqlite":
        db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}", migrations=str(MIGRATIONS))
    else:
        urls = await request.getfixturevalue("postgres").create_database(f"met_rpc_{uuid.uuid4().hex[:6]}")
        db = await Database.open(urls.app_url, owner_url=urls.owner_url, migrations=str(MIGRATIONS))
    harness, channel = await start_harness(db)
    try:
        yield harness
    finally:
        await channel.close()
        await harness.service.stop(grace=0)


async def _answers(h) -> list:
    window = pb.UsageFilter(start_time=ts(T0 - 12 * D), end_time=ts(T0 + D))
    out = []
    for tenant in (A, B):
        for group in (
            [],
            [G.USAGE_GROUPING_MODEL, G.USAGE_GROUPING_DAY],
            [G.USAGE_GROUPING_MODEL, G.USAGE_GROUPING_HOUR],
            [G.USAGE_GROUPING_AGENT, G.USAGE_GROUPING_PRINCIPAL],
        ):
            resp = await h.stub.QueryUsage(
                pb.QueryUsageRequest(filter=window, group_by=group, page_size=1000), metadata=h.md(tenant)
            )
            out.append([r.SerializeToString(deterministic=True) for r in resp.rows])
    for period in (pb.CHARGEBACK_PERIOD_DAY, pb.CHARGEBACK_PERIOD_MONTH):
        resp = await h.stub.ExportChargeback(
            pb.ExportChargebackRequest(start_time=ts(T0 - 40 * D), end_time=ts(T0 + D), period=period), metadata=h.op()
        )
        out.append(([x.SerializeToString(deterministic=True) for x in resp.lines], resp.total_cost_usd))
    return out


async def _event_count(h, tenant: str) -> int:
    route = await h.service.db.router.existing(tenant, "pooled")
    async with raw_transaction(route.bind, tenant_id=tenant) as tx:
        return int(await tx.fetchval("SELECT count(*) FROM metering_usage_events WHERE tenant_id = $1", tenant))


async def test_query_and_chargeback_unchanged_after_detail_is_pruned(h):
    rng = random.Random(3)
    for p in (
        price("m1", T0 - 90 * D, 2_000_000, 10_000_000),
        price("m2", T0 - 90 * D, 1_000_000, 3_000_000),
        price("m1", T0 - 6 * D + 13 * 60 * 1_000_000, 3_000_000, 12_000_000),
    ):  # mid-hour
        await h.stub.SetPrice(pb.SetPriceRequest(price=p), metadata=h.op())
    for tenant in (A, B):
        events = [
            event(
                f"{tenant}-{i}",
                model=rng.choice(["m1", "m2"]),
                at_us=T0 - rng.randint(0, 10 * D),
                input_tokens=rng.randint(1, 9000),
                output_tokens=rng.randint(0, 900),
                agent_id=rng.choice(["", "triage"]),
                principal_id=rng.choice(["", "p_1"]),
            )
            for i in range(400)
        ]
        await h.stub.RecordUsage(pb.RecordUsageRequest(events=events), metadata=h.md(tenant))
    before = await _answers(h)
    assert all(before[:8]) and all(lines for lines, _ in before[8:])  # something to compare

    async def policies():
        yield Policy(A, "pooled", usage_detail_days=1)
        yield Policy(B, "pooled", usage_detail_days=3650)

    sweeper = RetentionSweeper("metering", policies, h.service.retention_steps())
    pruned = await sweeper.run_once(now_us=T0 + 30 * 60 * 1_000_000)
    assert pruned > 300
    assert await _event_count(h, A) == 400 - pruned and await _event_count(h, B) == 400
    assert await _answers(h) == before
    assert await sweeper.run_once(now_us=T0 + 30 * 60 * 1_000_000) == 0

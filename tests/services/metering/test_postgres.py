"""Metering on real Postgres as the runtime role: exact budgets under concurrency, idempotency, RLS."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import asyncpg
import grpc
import pytest

from bulkhead.metering.v1 import metering_pb2 as pb
from bulkhead.metering.v1 import metering_pb2_grpc
from shared.client import make_channel
from shared.errors import error_details

from .helpers import T0, day_range, event, price, price_and_budget

A, B = "t_alpha", "t_bravo"
MODEL = "claude-test"
BUDGET = 10_000


async def _status(h, tenant=A):
    resp = await h.stub.GetQuotaStatus(pb.GetQuotaStatusRequest(), metadata=h.md(tenant))
    return {b.budget.unit: b for b in resp.budgets}


async def test_concurrent_reserve_commit_never_overspend(pg_metering):
    """500 concurrent Reserve+Commit pairs from 5 clients: used <= budget and == the sum committed.

    The model is priced and a money budget is set too, so every hold and settlement moves two
    counter rows at once (the case that deadlocks if rows are locked in varying order).
    """
    h = pg_metering
    await price_and_budget(h.stub, h.op(), A, MODEL, BUDGET)
    channels = [make_channel(h.service.running.address) for _ in range(5)]
    stubs = [metering_pb2_grpc.MeteringServiceStub(c) for c in channels]
    md = h.md(A, scopes=("metering.budget.write",))
    committed: list[int] = []
    charged_micros: list[int] = []
    rejected: list[dict] = []

    async def pair(i: int) -> None:
        stub = stubs[i % len(stubs)]
        try:
            res = await stub.ReserveBudget(
                pb.ReserveBudgetRequest(model=MODEL, prompt_tokens=30, max_output_tokens=70), metadata=md
            )
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            rejected.append(error_details(err))
            return
        actual = 40 + i % 61  # 40..100 tokens, never more than the 100 held
        done = await stub.CommitBudget(
            pb.CommitBudgetRequest(
                reservation_id=res.reservation_id, usage=pb.TokenCounts(input_tokens=30, output_tokens=actual - 30)
            ),
            metadata=md,
        )
        committed.append(actual)
        charged_micros.append(done.charged.micro_usd)

    try:
        await asyncio.gather(*(pair(i) for i in range(500)))
    finally:
        for channel in channels:
            await channel.close()
    statuses = await _status(h)
    status, money = statuses[pb.BUDGET_UNIT_TOKENS], statuses[pb.BUDGET_UNIT_MICRO_USD]
    assert len(committed) + len(rejected) == 500
    assert committed and rejected  # the budget allowed only part of them
    assert status.used == sum(committed) <= BUDGET
    assert status.held == 0
    # 30 input tokens at 3 micro-USD each, the rest at 15: exactly what was charged.
    assert money.used == sum(charged_micros) == sum(30 * 3 + (a - 30) * 15 for a in committed)
    assert money.held == 0
    assert all(
        r["reason"] == "BUDGET_EXHAUSTED" and r["quota"][0][0] == "budget:tokens" and r["retry_after"] is not None
        for r in rejected
    )


async def test_concurrent_leases_never_exceed_the_budget(pg_metering):
    """Many concurrent leases: the sum granted never passes the budget."""
    h = pg_metering
    await h.stub.SetQuota(
        pb.SetQuotaRequest(quota=pb.Quota(tenant_id=A, budgets=[pb.Budget(unit=pb.BUDGET_UNIT_TOKENS, limit=BUDGET)])),
        metadata=h.op(),
    )
    md = h.md(A)

    async def lease() -> int:
        try:
            resp = await h.stub.LeaseBudget(pb.LeaseBudgetRequest(model=MODEL, tokens=700, min_tokens=100), metadata=md)
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return 0
        return resp.lease.granted.tokens

    granted = await asyncio.gather(*(lease() for _ in range(40)))
    status = (await _status(h))[pb.BUDGET_UNIT_TOKENS]
    assert sum(granted) == status.held <= BUDGET
    assert sum(granted) > BUDGET - 100  # everything that could be leased was


async def test_lease_expiry_returns_unspent_budget_on_postgres(pg_metering):
    """An abandoned lease's unspent part comes back when it expires; its reported spend is charged."""
    h = pg_metering
    await h.stub.SetQuota(
        pb.SetQuotaRequest(quota=pb.Quota(tenant_id=A, budgets=[pb.Budget(unit=pb.BUDGET_UNIT_TOKENS, limit=1000)])),
        metadata=h.op(),
    )
    lease = (
        await h.stub.LeaseBudget(pb.LeaseBudgetRequest(model=MODEL, tokens=1000, ttl_seconds=5), metadata=h.md(A))
    ).lease
    await h.stub.RenewLease(
        pb.RenewLeaseRequest(lease_id=lease.lease_id, spent=pb.TokenCounts(output_tokens=300), ttl_seconds=5),
        metadata=h.md(A),
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await h.stub.ReserveBudget(pb.ReserveBudgetRequest(model=MODEL, prompt_tokens=1), metadata=h.md(A))
    h.clock.advance(6)
    assert await h.service.sweeper.run_once() == 1
    status = (await _status(h))[pb.BUDGET_UNIT_TOKENS]
    assert (status.used, status.held, status.remaining) == (300, 0, 700)


async def test_idempotent_ingest_and_priced_query_on_postgres(pg_metering):
    """The Postgres batch path counts repeats once and prices each event at its own time."""
    h = pg_metering
    await h.stub.SetPrice(pb.SetPriceRequest(price=price("m", T0 - 10, 1_000_000, 2_000_000)), metadata=h.op())
    await h.stub.SetPrice(pb.SetPriceRequest(price=price("m", T0 + 10, 3_000_000, 4_000_000)), metadata=h.op())
    batch = pb.RecordUsageRequest(
        events=[event(f"k{i}", model="m", at_us=T0 + i * 10, input_tokens=1_000_000, output_tokens=0) for i in range(3)]
    )
    results = [await h.stub.RecordUsage(batch, metadata=h.md(A)) for _ in range(3)]
    assert [r.recorded_count for r in results] == [3, 0, 0]
    resp = await h.stub.QueryUsage(
        pb.QueryUsageRequest(filter=day_range(), group_by=[pb.USAGE_GROUPING_MODEL, pb.USAGE_GROUPING_HOUR]),
        metadata=h.md(A),
    )
    [row] = resp.rows
    assert (row.event_count, Decimal(row.cost_usd)) == (3, Decimal(1 + 3 + 3))


async def test_raw_sql_as_the_app_role_sees_only_its_tenant(pg_metering):
    """Row-level security: raw SQL without the ORM sees only the tenant named by app.tenant_id."""
    h = pg_metering
    await h.stub.RecordUsage(pb.RecordUsageRequest(events=[event("a")]), metadata=h.md(A))
    await h.stub.RecordUsage(pb.RecordUsageRequest(events=[event("b1"), event("b2")]), metadata=h.md(B))
    conn = await asyncpg.connect(h.urls.app_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM metering_usage_events") == 0
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.tenant_id', $1, true)", B)
            assert await conn.fetchval("SELECT count(*) FROM metering_usage_events") == 2
            with pytest.raises(asyncpg.PostgresError):
                await conn.execute(
                    "INSERT INTO metering_usage_events (tenant_id, idempotency_key, principal_id, "
                    "agent_id, run_id, trace_id, model, input_tokens, output_tokens, "
                    "cache_write_tokens, cache_read_tokens, latency_ms, outcome, occurred_us, hour, "
                    "day, recorded_us) VALUES ($1, 'x', '', '', '', '', 'm', 0, 0, 0, 0, 0, 1, 1, 0, "
                    "0, 0)",
                    A,
                )
    finally:
        await conn.close()


async def test_concurrent_retries_of_one_reservation_hold_once(pg_metering):
    """Ten concurrent ReserveBudget calls with one idempotency key make one reservation."""
    h = pg_metering
    await h.stub.SetQuota(
        pb.SetQuotaRequest(quota=pb.Quota(tenant_id=A, budgets=[pb.Budget(unit=pb.BUDGET_UNIT_TOKENS, limit=BUDGET)])),
        metadata=h.op(),
    )
    request = pb.ReserveBudgetRequest(model=MODEL, prompt_tokens=10, max_output_tokens=10, idempotency_key="req-7")
    replies = await asyncio.gather(*(h.stub.ReserveBudget(request, metadata=h.md(A)) for _ in range(10)))
    assert len({r.reservation_id for r in replies}) == 1
    assert (await _status(h))[pb.BUDGET_UNIT_TOKENS].held == 20


async def test_bridge_tenant_holds_live_in_its_own_schema(pg_metering):
    """The raw hold SQL of a bridge-tier tenant lands in its schema (search_path), not in the pooled tables."""
    from shared.db import bridge_schema

    h, tenant = pg_metering, "t_bridgebudget"
    md = h.md(tenant, tier="bridge")
    await h.stub.ReserveBudget(pb.ReserveBudgetRequest(model=MODEL, prompt_tokens=1), metadata=md)  # known as bridge
    await h.stub.SetQuota(
        pb.SetQuotaRequest(
            quota=pb.Quota(tenant_id=tenant, budgets=[pb.Budget(unit=pb.BUDGET_UNIT_TOKENS, limit=100)])
        ),
        metadata=h.op(),
    )
    res = await h.stub.ReserveBudget(pb.ReserveBudgetRequest(model=MODEL, prompt_tokens=60), metadata=md)
    await h.stub.CommitBudget(
        pb.CommitBudgetRequest(reservation_id=res.reservation_id, usage=pb.TokenCounts(input_tokens=50)), metadata=md
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await h.stub.ReserveBudget(pb.ReserveBudgetRequest(model=MODEL, prompt_tokens=50), metadata=md)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # 1 held + 50 used + 50 > 100
    conn = await asyncpg.connect(h.urls.app_dsn)
    try:
        schema = bridge_schema(tenant)
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.tenant_id', $1, true)", tenant)
            assert await conn.fetchval(f'SELECT count(*) FROM "{schema}".metering_holds') == 2
            assert (
                await conn.fetchval(f"SELECT used FROM \"{schema}\".metering_budget_counters WHERE unit = 'tokens'")
                == 50
            )
            assert await conn.fetchval("SELECT count(*) FROM public.metering_holds") == 0
    finally:
        await conn.close()

"""Reserve and Commit in one Postgres round trip (migration 0008's functions, outside BEGIN/COMMIT):
the same outcomes as the transactional path, nothing half-written, nothing left on the connection."""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
import pytest

from bulkhead.metering.v1 import metering_pb2 as pb
from services.metering import oneshot
from services.metering.server import MIGRATIONS
from shared.db import Database, bridge_schema
from shared.errors import error_details
from shared.tenancy import TenantContext, tenant_scope

from .helpers import T0, price

A, B = "t_alpha", "t_bravo"
MODEL = "claude-test"


async def _quota(h, tenant, *budgets):
    await h.stub.SetQuota(pb.SetQuotaRequest(quota=pb.Quota(tenant_id=tenant, budgets=list(budgets))), metadata=h.op())


async def _status(h, tenant=A, tier="pooled"):
    resp = await h.stub.GetQuotaStatus(pb.GetQuotaStatusRequest(), metadata=h.md(tenant, tier=tier))
    return {b.budget.unit: (b.used, b.held) for b in resp.budgets}


async def _as_tenant(h, tenant, sql, *args, schema=None):
    conn = await asyncpg.connect(h.urls.app_dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.tenant_id', $1, true)", tenant)
            if schema:
                await conn.execute("SELECT set_config('search_path', $1, true)", schema)
            return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def test_a_refused_money_hold_leaves_the_tokens_counter_alone(pg_metering):
    """The tokens counter moves before the micro_usd one refuses: the whole call rolls back, so a later
    status shows nothing held and no hold row exists."""
    h = pg_metering
    await h.stub.SetPrice(pb.SetPriceRequest(price=price(MODEL, T0 - 1, 3_000_000, 15_000_000)), metadata=h.op())
    await _quota(
        h,
        A,
        pb.Budget(unit=pb.BUDGET_UNIT_TOKENS, limit=1_000_000),
        pb.Budget(unit=pb.BUDGET_UNIT_MICRO_USD, limit=1_500),  # 100 + 100 tokens cost 300 + 1500 micro-USD
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await h.stub.ReserveBudget(
            pb.ReserveBudgetRequest(model=MODEL, prompt_tokens=100, max_output_tokens=100), metadata=h.md(A)
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_details(err.value)["quota"][0][0] == "budget:micro_usd"
    assert await _status(h) == {pb.BUDGET_UNIT_TOKENS: (0, 0), pb.BUDGET_UNIT_MICRO_USD: (0, 0)}
    assert (await _as_tenant(h, A, "SELECT count(*) FROM metering_holds"))[0][0] == 0
    # A hold that fits still goes through afterwards, and holds both units.
    res = await h.stub.ReserveBudget(
        pb.ReserveBudgetRequest(model=MODEL, prompt_tokens=100, max_output_tokens=50), metadata=h.md(A)
    )
    assert (res.held.tokens, res.held.micro_usd) == (150, 300 + 750)
    assert await _status(h) == {pb.BUDGET_UNIT_TOKENS: (0, 150), pb.BUDGET_UNIT_MICRO_USD: (0, 1050)}


async def test_a_soft_budget_passed_flags_the_reservation_in_the_same_call(pg_metering):
    """Past a soft limit the reservation is made and flagged, in the reply and in its row."""
    h = pg_metering
    await _quota(h, A, pb.Budget(unit=pb.BUDGET_UNIT_TOKENS, limit=100, mode=pb.BUDGET_MODE_SOFT))
    first = await h.stub.ReserveBudget(pb.ReserveBudgetRequest(model=MODEL, prompt_tokens=80), metadata=h.md(A))
    second = await h.stub.ReserveBudget(pb.ReserveBudgetRequest(model=MODEL, prompt_tokens=80), metadata=h.md(A))
    assert (first.over_budget, second.over_budget) == (False, True)
    rows = await _as_tenant(h, A, "SELECT hold_id, over_budget FROM metering_holds")
    assert dict(rows) == {first.reservation_id: False, second.reservation_id: True}
    assert await _status(h) == {pb.BUDGET_UNIT_TOKENS: (0, 160)}


async def test_a_repeated_key_returns_the_first_reservation_with_its_flag(pg_metering):
    """A retried keyed reservation gets the first one's id, amounts, expiry and flag, and holds nothing more."""
    h = pg_metering
    await _quota(h, A, pb.Budget(unit=pb.BUDGET_UNIT_TOKENS, limit=50, mode=pb.BUDGET_MODE_SOFT))
    request = pb.ReserveBudgetRequest(model=MODEL, prompt_tokens=60, idempotency_key="k-1")
    first = await h.stub.ReserveBudget(request, metadata=h.md(A))
    again = await h.stub.ReserveBudget(request, metadata=h.md(A))
    assert first.over_budget and again == first
    assert await _status(h) == {pb.BUDGET_UNIT_TOKENS: (0, 60)}


async def test_commit_once_then_the_same_commit_repeats_and_another_is_refused(pg_metering):
    """The one-trip settle charges once; a repeat gets the first result, a different one FAILED_PRECONDITION."""
    h = pg_metering
    await _quota(h, A, pb.Budget(unit=pb.BUDGET_UNIT_TOKENS, limit=1000))
    res = await h.stub.ReserveBudget(
        pb.ReserveBudgetRequest(model=MODEL, prompt_tokens=40, max_output_tokens=60), metadata=h.md(A)
    )
    commit = pb.CommitBudgetRequest(
        reservation_id=res.reservation_id, usage=pb.TokenCounts(input_tokens=40, output_tokens=10)
    )
    first = await h.stub.CommitBudget(commit, metadata=h.md(A))
    assert (first.charged.tokens, first.released.tokens) == (50, 50)
    assert await h.stub.CommitBudget(commit, metadata=h.md(A)) == first
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await h.stub.CommitBudget(
            pb.CommitBudgetRequest(reservation_id=res.reservation_id, usage=pb.TokenCounts(input_tokens=1)),
            metadata=h.md(A),
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert await _status(h) == {pb.BUDGET_UNIT_TOKENS: (50, 0)}


async def test_another_tenants_reservation_cannot_be_committed(pg_metering):
    """B committing A's reservation id is NOT_FOUND, as for a random id, and A's hold stays open."""
    h = pg_metering
    res = await h.stub.ReserveBudget(pb.ReserveBudgetRequest(model=MODEL, prompt_tokens=10), metadata=h.md(A))
    for reservation_id in (res.reservation_id, "res_doesnotexist"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.stub.CommitBudget(
                pb.CommitBudgetRequest(reservation_id=reservation_id, usage=pb.TokenCounts(input_tokens=1)),
                metadata=h.md(B),
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert [tuple(r) for r in await _as_tenant(h, A, "SELECT state FROM metering_holds")] == [("open",)]


async def test_bridge_and_silo_tenants_reserve_and_commit_in_their_own_store(pg_metering):
    """The one-trip calls of a bridge tenant run its schema's functions, a silo tenant's its database's."""
    h = pg_metering
    for tenant, tier in (("t_bridgeone", "bridge"), ("t_siloone", "silo")):
        md = h.md(tenant, tier=tier)
        await h.stub.ReserveBudget(pb.ReserveBudgetRequest(model=MODEL, prompt_tokens=1), metadata=md)
        await _quota(h, tenant, pb.Budget(unit=pb.BUDGET_UNIT_TOKENS, limit=100))
        res = await h.stub.ReserveBudget(pb.ReserveBudgetRequest(model=MODEL, prompt_tokens=70), metadata=md)
        done = await h.stub.CommitBudget(
            pb.CommitBudgetRequest(reservation_id=res.reservation_id, usage=pb.TokenCounts(input_tokens=30)),
            metadata=md,
        )
        assert (done.charged.tokens, done.released.tokens) == (30, 40)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.stub.ReserveBudget(pb.ReserveBudgetRequest(model=MODEL, prompt_tokens=70), metadata=md)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # 1 held + 30 used + 70 > 100
        assert await _status(h, tenant, tier) == {pb.BUDGET_UNIT_TOKENS: (30, 1)}
    schema = bridge_schema("t_bridgeone")
    rows = await _as_tenant(h, "t_bridgeone", "SELECT count(*) FROM metering_holds", schema=schema)
    assert rows[0][0] == 2
    assert (await _as_tenant(h, "t_bridgeone", "SELECT count(*) FROM public.metering_holds"))[0][0] == 0
    assert (await _as_tenant(h, "t_siloone", "SELECT count(*) FROM public.metering_holds"))[0][0] == 0


async def test_the_functions_run_as_the_caller_and_leave_no_tenant_on_the_connection(pg_metering):
    """SECURITY INVOKER (row-level security applies), and app.tenant_id ends with the call's own transaction."""
    h = pg_metering
    found = await _as_tenant(
        h,
        A,
        "SELECT proname, prosecdef FROM pg_proc WHERE proname IN ('metering_reserve', 'metering_settle') "
        "ORDER BY proname",
    )
    assert [tuple(r) for r in found] == [("metering_reserve", False), ("metering_settle", False)]
    db = await Database.open(
        h.urls.app_url, migrations=str(MIGRATIONS), owner_url=h.urls.owner_url, pool_size=1, max_overflow=0
    )
    try:
        ctx = TenantContext(tenant_id=A, principal_id="p", scopes=frozenset({"*"}), tier="pooled")
        with tenant_scope(ctx):
            args = (A, "res_none", "reservation", "committed", T0, 1, 0, 0, 0, 1)
            assert await oneshot.call(db, "metering_settle", *args) == []
        async with db.engine.connect() as conn:  # the pool's only connection, the one the call used
            setting = await conn.exec_driver_sql("SELECT current_setting('app.tenant_id', true)")
            assert setting.scalar() in (None, "")
    finally:
        await db.close()


@pytest.fixture
def group_calls(monkeypatch):
    """How many reservations and settlements each shared (group commit) call carried."""
    from services.metering import budget_sql

    calls: dict[str, list[int]] = {"reserve": [], "settle": []}
    reserve_many, settle_many = budget_sql.reserve_many, budget_sql.settle_many

    async def spy_reserve(db, tenant_id, holds):
        calls["reserve"].append(len(holds))
        return await reserve_many(db, tenant_id, holds)

    async def spy_settle(db, tenant_id, kind, settles):
        calls["settle"].append(len(settles))
        return await settle_many(db, tenant_id, kind, settles)

    monkeypatch.setattr(budget_sql, "reserve_many", spy_reserve)
    monkeypatch.setattr(budget_sql, "settle_many", spy_settle)
    return calls


async def test_grouped_reservations_never_pass_the_hard_limit(pg_metering, group_calls):
    """60 concurrent reservations of 30 tokens against 1,000: exactly 33 are made (some in shared calls, the
    refused ones each alone after their shared call rolled back), and 990 tokens are held."""
    h = pg_metering
    await _quota(h, A, pb.Budget(unit=pb.BUDGET_UNIT_TOKENS, limit=1000))
    request = pb.ReserveBudgetRequest(model=MODEL, prompt_tokens=10, max_output_tokens=20)

    async def reserve():
        try:
            return await h.stub.ReserveBudget(request, metadata=h.md(A))
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return None

    replies = await asyncio.gather(*(reserve() for _ in range(60)))
    made = [r for r in replies if r is not None]
    assert len(made) == 33 and len({r.reservation_id for r in made}) == 33
    assert any(n > 1 for n in group_calls["reserve"])  # some went together
    assert await _status(h) == {pb.BUDGET_UNIT_TOKENS: (0, 990)}
    rows = await _as_tenant(h, A, "SELECT count(*), sum(tokens_held) FROM metering_holds WHERE state = 'open'")
    assert tuple(rows[0]) == (33, 990)


async def test_grouped_commits_charge_each_once_and_repeats_see_the_first(pg_metering, group_calls):
    """Concurrent commits, each reservation committed twice at once (once more with another usage): every
    reservation is charged once, the same repeat gets the first result, the different one is refused."""
    h = pg_metering
    await h.stub.SetPrice(pb.SetPriceRequest(price=price(MODEL, T0 - 1, 3_000_000, 15_000_000)), metadata=h.op())
    await _quota(
        h,
        A,
        pb.Budget(unit=pb.BUDGET_UNIT_TOKENS, limit=100_000),
        pb.Budget(unit=pb.BUDGET_UNIT_MICRO_USD, limit=10**9),
    )
    reservations = await asyncio.gather(
        *(
            h.stub.ReserveBudget(
                pb.ReserveBudgetRequest(model=MODEL, prompt_tokens=10, max_output_tokens=90), metadata=h.md(A)
            )
            for _ in range(20)
        )
    )

    async def commit(reservation_id, output):
        request = pb.CommitBudgetRequest(
            reservation_id=reservation_id, usage=pb.TokenCounts(input_tokens=10, output_tokens=output)
        )
        try:
            return await h.stub.CommitBudget(request, metadata=h.md(A))
        except grpc.aio.AioRpcError as err:
            return err.code()

    calls = [(r.reservation_id, 40) for r in reservations] * 2 + [(r.reservation_id, 41) for r in reservations[:5]]
    outcomes = await asyncio.gather(*(commit(rid, out) for rid, out in calls))
    for i in range(len(reservations)):
        first, again = outcomes[i], outcomes[20 + i]
        if i < 5:  # the third commit, with another usage, raced the two: only one usage can have been charged
            other = outcomes[40 + i]
            if isinstance(other, grpc.StatusCode):
                assert other == grpc.StatusCode.FAILED_PRECONDITION
                assert first == again and (first.charged.tokens, first.charged.micro_usd) == (50, 30 + 600)
            else:
                assert first == again == grpc.StatusCode.FAILED_PRECONDITION
                assert (other.charged.tokens, other.charged.micro_usd) == (51, 30 + 615)
            continue
        assert first == again and (first.charged.tokens, first.released.tokens) == (50, 50)
        assert first.charged.micro_usd == 30 + 600
    winners = [o for o in outcomes if not isinstance(o, grpc.StatusCode)]
    charged = {}
    for (rid, _), o in zip(calls, outcomes, strict=True):
        if not isinstance(o, grpc.StatusCode):
            charged[rid] = (o.charged.tokens, o.charged.micro_usd)
    assert winners and any(n > 1 for n in group_calls["settle"])
    assert await _status(h) == {
        pb.BUDGET_UNIT_TOKENS: (sum(t for t, _ in charged.values()), 0),
        pb.BUDGET_UNIT_MICRO_USD: (sum(m for _, m in charged.values()), 0),
    }

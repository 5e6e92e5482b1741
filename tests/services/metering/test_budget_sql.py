"""The raw hold and settlement SQL on both dialects: Postgres runs it as one statement per call
(data-modifying CTEs), SQLite as several, so every rule here is checked on each."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from bulkhead.metering.v1 import metering_pb2 as pb
from shared.errors import error_details

from .helpers import T0, price

A, B = "t_alpha", "t_bravo"
MODEL = "claude-test"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def h(request):
    """Metering on SQLite, then on Postgres (as the runtime role, under RLS)."""
    return request.getfixturevalue("metering" if request.param == "sqlite" else "pg_metering")


def _budget(unit, limit, mode=pb.BUDGET_MODE_HARD, period=pb.BUDGET_PERIOD_MONTH):
    return pb.Budget(unit=unit, limit=limit, mode=mode, period=period)


async def _set(h, tenant, *budgets):
    await h.stub.SetQuota(pb.SetQuotaRequest(quota=pb.Quota(tenant_id=tenant, budgets=list(budgets))), metadata=h.op())


async def _priced(h):
    # 3 micro-USD per input token, 15 per output token.
    await h.stub.SetPrice(pb.SetPriceRequest(price=price(MODEL, T0 - 1, 3_000_000, 15_000_000)), metadata=h.op())


async def _counters(h, tenant=A):
    resp = await h.stub.GetQuotaStatus(pb.GetQuotaStatusRequest(), metadata=h.md(tenant))
    return {b.budget.unit: (b.used, b.held) for b in resp.budgets}


async def _reserve(h, prompt, out, tenant=A, **kw):
    return await h.stub.ReserveBudget(
        pb.ReserveBudgetRequest(model=MODEL, prompt_tokens=prompt, max_output_tokens=out, **kw), metadata=h.md(tenant)
    )


async def _commit(h, reservation_id, i=0, o=0, tenant=A):
    return await h.stub.CommitBudget(
        pb.CommitBudgetRequest(reservation_id=reservation_id, usage=pb.TokenCounts(input_tokens=i, output_tokens=o)),
        metadata=h.md(tenant),
    )


async def test_a_refusal_by_the_second_unit_leaves_the_first_untouched(h):
    """Tokens fit but money does not: RESOURCE_EXHAUSTED on money, and the tokens counter did not move."""
    await _priced(h)
    await _set(h, A, _budget(pb.BUDGET_UNIT_TOKENS, 10_000), _budget(pb.BUDGET_UNIT_MICRO_USD, 1_000))
    await _reserve(h, 10, 10)  # 30 + 150 = 180 micro-USD
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _reserve(h, 100, 100)  # 300 + 1500 micro-USD: past the money budget
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_details(err.value)["quota"] == [("budget:micro_usd", "needs 1800; used 0, held 180, limit 1000")]
    assert await _counters(h) == {pb.BUDGET_UNIT_TOKENS: (0, 20), pb.BUDGET_UNIT_MICRO_USD: (0, 180)}


async def test_a_first_hold_bigger_than_the_budget_creates_nothing(h):
    """The very first hold of a period, past the limit, is refused without leaving a counter behind."""
    await _set(h, A, _budget(pb.BUDGET_UNIT_TOKENS, 100))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _reserve(h, 60, 41)
    assert error_details(err.value)["quota"] == [("budget:tokens", "needs 101; used 0, held 0, limit 100")]
    assert (await _reserve(h, 60, 40)).held.tokens == 100  # exactly the limit still fits


async def test_commit_charges_both_units_at_the_held_rates(h):
    """A commit moves tokens and money from held to used, priced at the reservation's rates."""
    await _priced(h)
    await _set(h, A, _budget(pb.BUDGET_UNIT_TOKENS, 10_000), _budget(pb.BUDGET_UNIT_MICRO_USD, 100_000))
    res = await _reserve(h, 100, 100)
    assert (res.held.tokens, res.held.micro_usd) == (200, 1800)
    # A later price change does not reprice the reservation.
    await h.stub.SetPrice(pb.SetPriceRequest(price=price(MODEL, T0, 30_000_000, 150_000_000)), metadata=h.op())
    done = await _commit(h, res.reservation_id, i=100, o=7)
    assert (done.charged.tokens, done.charged.micro_usd) == (107, 300 + 105)
    assert (done.released.tokens, done.released.micro_usd) == (93, 1800 - 405)
    assert await _counters(h) == {pb.BUDGET_UNIT_TOKENS: (107, 0), pb.BUDGET_UNIT_MICRO_USD: (405, 0)}


async def test_settling_refusals_change_nothing(h):
    """Over the hold, another tenant's id, or a second different commit: precise errors, counters as they were."""
    await _set(h, A, _budget(pb.BUDGET_UNIT_TOKENS, 1000))
    res = await _reserve(h, 10, 10)
    for kw, code, reason in (
        ({"i": 21}, grpc.StatusCode.INVALID_ARGUMENT, "EXCEEDS_HOLD"),
        ({"i": 1, "tenant": B}, grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _commit(h, res.reservation_id, **kw)
        assert (err.value.code(), error_details(err.value)["reason"]) == (code, reason)
    assert await _counters(h) == {pb.BUDGET_UNIT_TOKENS: (0, 20)}
    await _commit(h, res.reservation_id, i=5)
    again = await _commit(h, res.reservation_id, i=5)
    assert (again.charged.tokens, again.released.tokens) == (5, 15)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _commit(h, res.reservation_id, i=6)
    assert error_details(err.value)["reason"] == "RESERVATION_COMMITTED"
    assert await _counters(h) == {pb.BUDGET_UNIT_TOKENS: (5, 0)}


async def test_soft_budget_flag_is_stored_with_the_reservation(h):
    """A reservation past a soft budget is flagged, and its idempotent retry returns the flag too."""
    await _set(h, A, _budget(pb.BUDGET_UNIT_TOKENS, 100, mode=pb.BUDGET_MODE_SOFT))
    first = await _reserve(h, 100, 50, idempotency_key="soft-1")
    retry = await _reserve(h, 100, 50, idempotency_key="soft-1")
    assert (first.over_budget, retry.over_budget, retry.reservation_id) == (True, True, first.reservation_id)
    assert await _counters(h) == {pb.BUDGET_UNIT_TOKENS: (0, 150)}


async def test_lowering_a_quota_takes_effect_at_once(h):
    """Budget specs are cached per tenant, but a SetQuota on this replica drops the cached ones."""
    await _set(h, A, _budget(pb.BUDGET_UNIT_TOKENS, 1000))
    await _reserve(h, 50, 50)  # caches the specs
    await _set(h, A, _budget(pb.BUDGET_UNIT_TOKENS, 150))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _reserve(h, 50, 50)
    assert error_details(err.value)["quota"][0] == ("budget:tokens", "needs 100; used 0, held 100, limit 150")
    await _set(h, A)  # no budget at all: anything goes
    assert (await _reserve(h, 5000, 0)).held.tokens == 5000


async def test_renew_and_release_lease_rules(h):
    """Renew records a running spend within the grant; release charges it; B sees none of it."""
    await _priced(h)
    await _set(h, A, _budget(pb.BUDGET_UNIT_TOKENS, 1000), _budget(pb.BUDGET_UNIT_MICRO_USD, 100_000))
    lease = (await h.stub.LeaseBudget(pb.LeaseBudgetRequest(model=MODEL, tokens=100), metadata=h.md(A))).lease
    assert (lease.granted.tokens, lease.granted.micro_usd) == (100, 1500)  # priced at the dearest rate
    renew = pb.RenewLeaseRequest(lease_id=lease.lease_id, spent=pb.TokenCounts(input_tokens=40, output_tokens=10))
    renewed = (await h.stub.RenewLease(renew, metadata=h.md(A))).lease
    assert (renewed.spent.input_tokens, renewed.granted.tokens) == (40, 100)
    for spent, code, reason in (
        (pb.TokenCounts(input_tokens=39, output_tokens=10), grpc.StatusCode.INVALID_ARGUMENT, "SPEND_DECREASED"),
        (pb.TokenCounts(input_tokens=40, output_tokens=61), grpc.StatusCode.INVALID_ARGUMENT, "EXCEEDS_HOLD"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.stub.RenewLease(pb.RenewLeaseRequest(lease_id=lease.lease_id, spent=spent), metadata=h.md(A))
        assert (err.value.code(), error_details(err.value)["reason"]) == (code, reason)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await h.stub.RenewLease(renew, metadata=h.md(B))
    assert error_details(err.value)["reason"] == "LEASE_NOT_FOUND"
    done = await h.stub.ReleaseLease(
        pb.ReleaseLeaseRequest(lease_id=lease.lease_id, spent=pb.TokenCounts(input_tokens=50, output_tokens=10)),
        metadata=h.md(A),
    )
    assert (done.charged.tokens, done.charged.micro_usd) == (60, 150 + 150)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await h.stub.RenewLease(renew, metadata=h.md(A))
    assert (err.value.code(), error_details(err.value)["reason"]) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "LEASE_RELEASED",
    )
    assert await _counters(h) == {pb.BUDGET_UNIT_TOKENS: (60, 0), pb.BUDGET_UNIT_MICRO_USD: (300, 0)}


async def test_expiry_sums_many_holds_into_each_counter(h):
    """Expired reservations and leases of two periods each return exactly their unspent part."""
    await _set(h, A, _budget(pb.BUDGET_UNIT_TOKENS, 10_000, period=pb.BUDGET_PERIOD_DAY))
    h.clock.advance(12 * 3600 - 60)  # 23:59
    for _ in range(3):
        await _reserve(h, 10, 0, ttl_seconds=30)
    h.clock.advance(120)  # 00:01 the next day
    lease = (
        await h.stub.LeaseBudget(pb.LeaseBudgetRequest(model=MODEL, tokens=100, ttl_seconds=30), metadata=h.md(A))
    ).lease
    await h.stub.RenewLease(
        pb.RenewLeaseRequest(lease_id=lease.lease_id, spent=pb.TokenCounts(input_tokens=25), ttl_seconds=30),
        metadata=h.md(A),
    )
    await _reserve(h, 7, 0, ttl_seconds=300)  # still open after the sweep
    h.clock.advance(31)
    assert await h.service.sweeper.run_once() == 4
    assert await _counters(h) == {pb.BUDGET_UNIT_TOKENS: (25, 7)}
    h.clock.advance(-24 * 3600)
    assert await _counters(h) == {pb.BUDGET_UNIT_TOKENS: (0, 0)}


async def test_sweeps_racing_settlements_lose_nothing(h):
    """Sweepers running while holds are reserved, committed and expiring: every counter ends exact."""
    await _priced(h)
    await _set(h, A, _budget(pb.BUDGET_UNIT_TOKENS, 10**9), _budget(pb.BUDGET_UNIT_MICRO_USD, 10**12))
    for _ in range(20):  # abandoned: they expire during the race
        await _reserve(h, 5, 5, ttl_seconds=10)
    h.clock.advance(11)
    committed: list[int] = []

    async def pair(i: int) -> None:
        res = await _reserve(h, 10, 10)
        await _commit(h, res.reservation_id, i=10, o=i % 11)
        committed.append(10 + i % 11)

    async def sweep() -> int:
        return await h.service.sweeper.run_once()

    results = await asyncio.gather(*(pair(i) for i in range(60)), *(sweep() for _ in range(6)))
    assert sum(r for r in results if r is not None) == 20  # each expired hold was swept exactly once
    tokens_used = sum(committed)
    micros_used = sum(30 + 15 * (t - 10) for t in committed)
    assert await _counters(h) == {pb.BUDGET_UNIT_TOKENS: (tokens_used, 0), pb.BUDGET_UNIT_MICRO_USD: (micros_used, 0)}

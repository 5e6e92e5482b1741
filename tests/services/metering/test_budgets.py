"""Reservations, commits, releases, leases and expiry on budgets (embedded SQLite, fake clock)."""

from __future__ import annotations

import grpc
import pytest

from bulkhead.metering.v1 import metering_pb2 as pb
from shared.errors import error_details

from .helpers import T0, price

A, B = "t_alpha", "t_bravo"
MODEL = "claude-test"


def _quota(tenant, *budgets, rpm=0, tpm=0, concurrent=0):
    return pb.SetQuotaRequest(
        quota=pb.Quota(
            tenant_id=tenant,
            requests_per_minute=rpm,
            tokens_per_minute=tpm,
            concurrent_calls=concurrent,
            budgets=list(budgets),
        )
    )


def _tokens(limit, mode=pb.BUDGET_MODE_HARD, period=pb.BUDGET_PERIOD_MONTH):
    return pb.Budget(unit=pb.BUDGET_UNIT_TOKENS, limit=limit, mode=mode, period=period)


def _usage(i=0, o=0, cw=0, cr=0):
    return pb.TokenCounts(input_tokens=i, output_tokens=o, cache_write_tokens=cw, cache_read_tokens=cr)


async def _status(h, tenant=A):
    resp = await h.stub.GetQuotaStatus(pb.GetQuotaStatusRequest(), metadata=h.md(tenant))
    return {b.budget.unit: b for b in resp.budgets}, resp.quota


async def _reserve(h, prompt, out, tenant=A, **kw):
    return await h.stub.ReserveBudget(
        pb.ReserveBudgetRequest(model=MODEL, prompt_tokens=prompt, max_output_tokens=out, **kw), metadata=h.md(tenant)
    )


async def test_reserve_commit_charges_actual_and_releases_rest(metering):
    """Commit moves the real usage into used and returns the rest of the hold."""
    await metering.stub.SetQuota(_quota(A, _tokens(1000)), metadata=metering.op())
    res = await _reserve(metering, 100, 200)
    assert res.held.tokens == 300
    mid, _ = await _status(metering)
    assert (mid[pb.BUDGET_UNIT_TOKENS].used, mid[pb.BUDGET_UNIT_TOKENS].held) == (0, 300)
    done = await metering.stub.CommitBudget(
        pb.CommitBudgetRequest(reservation_id=res.reservation_id, usage=_usage(i=60, o=50, cr=40)),
        metadata=metering.md(A),
    )
    assert (done.charged.tokens, done.released.tokens) == (150, 150)
    after, _ = await _status(metering)
    tokens = after[pb.BUDGET_UNIT_TOKENS]
    assert (tokens.used, tokens.held, tokens.remaining) == (150, 0, 850)


async def test_hard_budget_refuses_with_quota_failure_and_retry_info(metering):
    """A reservation past a hard limit is RESOURCE_EXHAUSTED with QuotaFailure and RetryInfo."""
    await metering.stub.SetQuota(_quota(A, _tokens(500)), metadata=metering.op())
    await _reserve(metering, 100, 300)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _reserve(metering, 50, 60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = error_details(err.value)
    assert details["reason"] == "BUDGET_EXHAUSTED"
    assert details["quota"] == [("budget:tokens", "needs 110; used 0, held 400, limit 500")]
    # The open reservation expires in 300 s (the default TTL): that is when budget may come back.
    assert details["retry_after"] == 300.0
    status, _ = await _status(metering)
    assert status[pb.BUDGET_UNIT_TOKENS].held == 400  # the refused one held nothing


async def test_soft_budget_grants_and_flags(metering):
    """A soft budget lets a reservation pass the limit and flags it over_budget."""
    await metering.stub.SetQuota(_quota(A, _tokens(100, mode=pb.BUDGET_MODE_SOFT)), metadata=metering.op())
    assert not (await _reserve(metering, 50, 40)).over_budget
    assert (await _reserve(metering, 50, 40)).over_budget


async def test_release_returns_everything(metering):
    """Release charges nothing and returns the whole hold; a second release returns the same."""
    await metering.stub.SetQuota(_quota(A, _tokens(1000)), metadata=metering.op())
    res = await _reserve(metering, 10, 90)
    req = pb.ReleaseBudgetRequest(reservation_id=res.reservation_id)
    first = await metering.stub.ReleaseBudget(req, metadata=metering.md(A))
    again = await metering.stub.ReleaseBudget(req, metadata=metering.md(A))
    assert first.released.tokens == again.released.tokens == 100
    status, _ = await _status(metering)
    assert (status[pb.BUDGET_UNIT_TOKENS].used, status[pb.BUDGET_UNIT_TOKENS].held) == (0, 0)


async def test_commit_is_idempotent_and_refuses_a_different_second_commit(metering):
    """The same commit twice charges once; a different one, or a commit after release, fails precisely."""
    await metering.stub.SetQuota(_quota(A, _tokens(1000)), metadata=metering.op())
    res = await _reserve(metering, 10, 90)
    commit = pb.CommitBudgetRequest(reservation_id=res.reservation_id, usage=_usage(i=10, o=20))
    await metering.stub.CommitBudget(commit, metadata=metering.md(A))
    await metering.stub.CommitBudget(commit, metadata=metering.md(A))
    status, _ = await _status(metering)
    assert status[pb.BUDGET_UNIT_TOKENS].used == 30
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await metering.stub.CommitBudget(
            pb.CommitBudgetRequest(reservation_id=res.reservation_id, usage=_usage(i=10, o=21)), metadata=metering.md(A)
        )
    assert (err.value.code(), error_details(err.value)["reason"]) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "RESERVATION_COMMITTED",
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await metering.stub.ReleaseBudget(
            pb.ReleaseBudgetRequest(reservation_id=res.reservation_id), metadata=metering.md(A)
        )
    assert error_details(err.value)["reason"] == "RESERVATION_COMMITTED"


async def test_commit_above_the_reservation_is_refused_and_changes_nothing(metering):
    """Usage above what was reserved is INVALID_ARGUMENT and the hold stays as it was."""
    await metering.stub.SetQuota(_quota(A, _tokens(1000)), metadata=metering.op())
    res = await _reserve(metering, 10, 10)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await metering.stub.CommitBudget(
            pb.CommitBudgetRequest(reservation_id=res.reservation_id, usage=_usage(i=15, o=6)), metadata=metering.md(A)
        )
    assert (err.value.code(), error_details(err.value)["reason"]) == (grpc.StatusCode.INVALID_ARGUMENT, "EXCEEDS_HOLD")
    status, _ = await _status(metering)
    assert (status[pb.BUDGET_UNIT_TOKENS].used, status[pb.BUDGET_UNIT_TOKENS].held) == (0, 20)


async def test_expired_reservation_returns_its_budget(metering):
    """An uncommitted reservation expires: its hold returns and a late commit is refused."""
    await metering.stub.SetQuota(_quota(A, _tokens(100)), metadata=metering.op())
    res = await _reserve(metering, 50, 50, ttl_seconds=30)
    metering.clock.advance(31)
    # The budget is full, so the refused reservation sweeps the expired one and then fits.
    again = await _reserve(metering, 60, 40)
    assert again.held.tokens == 100
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await metering.stub.CommitBudget(
            pb.CommitBudgetRequest(reservation_id=res.reservation_id, usage=_usage(i=1)), metadata=metering.md(A)
        )
    assert error_details(err.value)["reason"] == "RESERVATION_EXPIRED"


async def test_background_sweep_returns_expired_holds(metering):
    """The sweeper returns an abandoned reservation's hold without any further call from its tenant."""
    await metering.stub.SetQuota(_quota(A, _tokens(100)), metadata=metering.op())
    await _reserve(metering, 10, 10, ttl_seconds=5)
    metering.clock.advance(6)
    assert await metering.service.sweeper.run_once() == 1
    assert await metering.service.sweeper.run_once() == 0


async def test_reserve_with_the_same_key_returns_the_same_reservation(metering):
    """A retried ReserveBudget with its idempotency key holds budget once."""
    await metering.stub.SetQuota(_quota(A, _tokens(1000)), metadata=metering.op())
    first = await _reserve(metering, 10, 10, idempotency_key="req-1")
    second = await _reserve(metering, 10, 10, idempotency_key="req-1")
    assert first.reservation_id == second.reservation_id
    status, _ = await _status(metering)
    assert status[pb.BUDGET_UNIT_TOKENS].held == 20


async def test_money_budget_holds_worst_case_and_charges_exact_cost(metering):
    """A micro-USD budget holds the worst-case price and is charged the real cost, rounded up."""
    await metering.stub.SetPrice(
        pb.SetPriceRequest(price=price(MODEL, T0 - 1, 3_000_000, 15_000_000, 3_750_000, 300_000)),
        metadata=metering.op(),
    )
    budget = pb.Budget(unit=pb.BUDGET_UNIT_MICRO_USD, limit=10_000)
    await metering.stub.SetQuota(_quota(A, budget), metadata=metering.op())
    res = await _reserve(metering, 1000, 100)
    # Prompt at the dearest prompt rate (cache write 3.75) + output at 15: 3750 + 1500 micro-USD.
    assert res.held.micro_usd == 5250
    done = await metering.stub.CommitBudget(
        pb.CommitBudgetRequest(reservation_id=res.reservation_id, usage=_usage(i=1, o=100, cr=999)),
        metadata=metering.md(A),
    )
    # 1*3 + 100*15 + 999*0.3 = 1802.7 micro-USD -> 1803.
    assert (done.charged.micro_usd, done.released.micro_usd) == (1803, 5250 - 1803)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _reserve(metering, 2200, 1)  # 8250 + 15 > 10000 - 1803
    assert error_details(err.value)["quota"][0][0] == "budget:micro_usd"


async def test_money_budget_refuses_unpriced_models(metering):
    """With a money budget, a model without a price cannot be reserved."""
    await metering.stub.SetQuota(_quota(A, pb.Budget(unit=pb.BUDGET_UNIT_MICRO_USD, limit=10)), metadata=metering.op())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _reserve(metering, 1, 1)
    assert (err.value.code(), error_details(err.value)["reason"]) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "MODEL_NOT_PRICED",
    )


async def test_daily_budget_starts_afresh_the_next_day(metering):
    """A daily budget used up today has room again tomorrow."""
    await metering.stub.SetQuota(_quota(A, _tokens(100, period=pb.BUDGET_PERIOD_DAY)), metadata=metering.op())
    res = await _reserve(metering, 50, 50)
    await metering.stub.CommitBudget(
        pb.CommitBudgetRequest(reservation_id=res.reservation_id, usage=_usage(i=100)), metadata=metering.md(A)
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await _reserve(metering, 1, 0)
    metering.clock.advance(13 * 3600)  # T0 is noon
    assert (await _reserve(metering, 1, 0)).held.tokens == 1


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"model": "", "prompt_tokens": 1}, "model"),
        ({"model": MODEL, "prompt_tokens": -1}, "prompt_tokens"),
        ({"model": MODEL}, "max_output_tokens"),
        ({"model": MODEL, "prompt_tokens": 1, "ttl_seconds": 7200}, "ttl_seconds"),
    ],
)
async def test_bad_reservations_are_refused_precisely(metering, kw, field):
    """Malformed reservations are INVALID_ARGUMENT naming the field, and hold nothing."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await metering.stub.ReserveBudget(pb.ReserveBudgetRequest(**kw), metadata=metering.md(A))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error_details(err.value)["bad_request"]


async def test_quota_status_names_the_limits_the_proxy_enforces(metering):
    """GetQuotaStatus returns requests/min, tokens/min and concurrency for the caller's tenant only."""
    await metering.stub.SetQuota(_quota(A, _tokens(10), rpm=60, tpm=9000, concurrent=4), metadata=metering.op())
    _, quota = await _status(metering)
    assert (quota.tenant_id, quota.requests_per_minute, quota.tokens_per_minute, quota.concurrent_calls) == (
        A,
        60,
        9000,
        4,
    )
    budgets_b, quota_b = await _status(metering, tenant=B)
    assert (quota_b.tenant_id, quota_b.requests_per_minute, budgets_b) == (B, 0, {})


async def test_other_tenants_cannot_touch_a_reservation(metering):
    """B cannot commit or release A's reservation: NOT_FOUND, and A's hold is untouched."""
    await metering.stub.SetQuota(_quota(A, _tokens(1000)), metadata=metering.op())
    res = await _reserve(metering, 10, 10)
    for call, req in (
        (metering.stub.CommitBudget, pb.CommitBudgetRequest(reservation_id=res.reservation_id, usage=_usage(i=1))),
        (metering.stub.ReleaseBudget, pb.ReleaseBudgetRequest(reservation_id=res.reservation_id)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(req, metadata=metering.md(B))
        assert (err.value.code(), error_details(err.value)["reason"]) == (
            grpc.StatusCode.NOT_FOUND,
            "RESERVATION_NOT_FOUND",
        )
        assert res.reservation_id not in err.value.details()
    status, _ = await _status(metering)
    assert status[pb.BUDGET_UNIT_TOKENS].held == 20


async def test_a_reservation_in_one_tenant_spends_only_its_budget(metering):
    """B's reservations neither see nor consume A's budget."""
    await metering.stub.SetQuota(_quota(A, _tokens(100)), metadata=metering.op())
    await metering.stub.SetQuota(_quota(B, _tokens(100)), metadata=metering.op())
    await _reserve(metering, 100, 0, tenant=B)
    assert (await _reserve(metering, 100, 0)).held.tokens == 100
    status_b, _ = await _status(metering, tenant=B)
    assert status_b[pb.BUDGET_UNIT_TOKENS].held == 100


# ------------------------------------------------------------------ leases


async def _lease(h, tokens, tenant=A, **kw):
    resp = await h.stub.LeaseBudget(pb.LeaseBudgetRequest(model=MODEL, tokens=tokens, **kw), metadata=h.md(tenant))
    return resp.lease


async def test_a_lease_in_one_tenant_spends_only_its_budget(metering):
    """B's lease neither sees nor consumes A's budget."""
    await metering.stub.SetQuota(_quota(A, _tokens(100)), metadata=metering.op())
    await metering.stub.SetQuota(_quota(B, _tokens(50)), metadata=metering.op())
    assert (await _lease(metering, 100, tenant=B, min_tokens=1)).granted.tokens == 50
    assert (await _lease(metering, 100)).granted.tokens == 100


async def test_lease_grants_what_is_left_down_to_min(metering):
    """A lease gets what remains when less than asked, but never below min_tokens."""
    await metering.stub.SetQuota(_quota(A, _tokens(1000)), metadata=metering.op())
    first = await _lease(metering, 700)
    second = await _lease(metering, 700, min_tokens=100)
    assert (first.granted.tokens, second.granted.tokens) == (700, 300)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _lease(metering, 50, min_tokens=1)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_details(err.value)["quota"][0][0] == "budget:tokens"


async def test_release_lease_charges_spend_and_returns_the_rest(metering):
    """Releasing a lease charges what it spent and returns the unspent part."""
    await metering.stub.SetQuota(_quota(A, _tokens(1000)), metadata=metering.op())
    lease = await _lease(metering, 600)
    done = await metering.stub.ReleaseLease(
        pb.ReleaseLeaseRequest(lease_id=lease.lease_id, spent=_usage(i=200, o=50)), metadata=metering.md(A)
    )
    assert (done.charged.tokens, done.released.tokens) == (250, 350)
    status, _ = await _status(metering)
    assert (status[pb.BUDGET_UNIT_TOKENS].used, status[pb.BUDGET_UNIT_TOKENS].held) == (250, 0)


async def test_lease_expiry_charges_reported_spend_and_returns_the_rest(metering):
    """A crashed leaseholder: at expiry its last reported spend is charged and the rest comes back."""
    await metering.stub.SetQuota(_quota(A, _tokens(1000)), metadata=metering.op())
    lease = await _lease(metering, 800, ttl_seconds=10)
    renewed = await metering.stub.RenewLease(
        pb.RenewLeaseRequest(lease_id=lease.lease_id, spent=_usage(i=120), ttl_seconds=10), metadata=metering.md(A)
    )
    assert renewed.lease.spent.input_tokens == 120
    metering.clock.advance(11)  # the holder died: no release, no renewal
    status, _ = await _status(metering)  # status reads sweep expired holds first
    assert (status[pb.BUDGET_UNIT_TOKENS].used, status[pb.BUDGET_UNIT_TOKENS].held) == (120, 0)
    assert status[pb.BUDGET_UNIT_TOKENS].remaining == 880
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await metering.stub.ReleaseLease(
            pb.ReleaseLeaseRequest(lease_id=lease.lease_id, spent=_usage(i=120)), metadata=metering.md(A)
        )
    assert error_details(err.value)["reason"] == "LEASE_EXPIRED"


async def test_renew_refuses_spend_going_down_or_past_the_grant(metering):
    """Spend is a running total within the grant."""
    await metering.stub.SetQuota(_quota(A, _tokens(1000)), metadata=metering.op())
    lease = await _lease(metering, 100)
    await metering.stub.RenewLease(
        pb.RenewLeaseRequest(lease_id=lease.lease_id, spent=_usage(i=50)), metadata=metering.md(A)
    )
    for spent, reason in ((_usage(i=40), "SPEND_DECREASED"), (_usage(i=50, o=51), "EXCEEDS_HOLD")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await metering.stub.RenewLease(
                pb.RenewLeaseRequest(lease_id=lease.lease_id, spent=spent), metadata=metering.md(A)
            )
        assert (err.value.code(), error_details(err.value)["reason"]) == (grpc.StatusCode.INVALID_ARGUMENT, reason)


async def test_other_tenants_cannot_touch_a_lease(metering):
    """B cannot renew or release A's lease: NOT_FOUND, and A's grant is untouched."""
    await metering.stub.SetQuota(_quota(A, _tokens(1000)), metadata=metering.op())
    lease = await _lease(metering, 100)
    for call, req in (
        (metering.stub.RenewLease, pb.RenewLeaseRequest(lease_id=lease.lease_id)),
        (metering.stub.ReleaseLease, pb.ReleaseLeaseRequest(lease_id=lease.lease_id)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(req, metadata=metering.md(B))
        assert (err.value.code(), error_details(err.value)["reason"]) == (grpc.StatusCode.NOT_FOUND, "LEASE_NOT_FOUND")
    status, _ = await _status(metering)
    assert status[pb.BUDGET_UNIT_TOKENS].held == 100


async def test_budget_rpcs_need_the_budget_scope(metering):
    """A read-only token cannot reserve, commit, release or lease."""
    md = metering.md(A, scopes=("metering.usage.read", "metering.quota.read"))
    calls = [
        (metering.stub.ReserveBudget, pb.ReserveBudgetRequest(model=MODEL, prompt_tokens=1)),
        (metering.stub.CommitBudget, pb.CommitBudgetRequest(reservation_id="res_x")),
        (metering.stub.ReleaseBudget, pb.ReleaseBudgetRequest(reservation_id="res_x")),
        (metering.stub.LeaseBudget, pb.LeaseBudgetRequest(model=MODEL, tokens=1)),
        (metering.stub.RenewLease, pb.RenewLeaseRequest(lease_id="lease_x")),
        (metering.stub.ReleaseLease, pb.ReleaseLeaseRequest(lease_id="lease_x")),
    ]
    for call, req in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(req, metadata=md)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    "method, request_, field, reason",
    [
        ("CommitBudget", pb.CommitBudgetRequest(), "reservation_id", "INVALID_ARGUMENT"),
        (
            "CommitBudget",
            pb.CommitBudgetRequest(reservation_id="res_x", usage=_usage(i=-1)),
            "usage.input_tokens",
            "INVALID_USAGE",
        ),
        ("ReleaseBudget", pb.ReleaseBudgetRequest(), "reservation_id", "INVALID_ARGUMENT"),
        ("LeaseBudget", pb.LeaseBudgetRequest(model=MODEL), "tokens", "INVALID_LEASE"),
        ("LeaseBudget", pb.LeaseBudgetRequest(model=MODEL, tokens=5, min_tokens=6), "min_tokens", "INVALID_LEASE"),
        ("LeaseBudget", pb.LeaseBudgetRequest(tokens=5), "model", "INVALID_LEASE"),
        ("RenewLease", pb.RenewLeaseRequest(), "lease_id", "INVALID_ARGUMENT"),
        (
            "ReleaseLease",
            pb.ReleaseLeaseRequest(lease_id="lease_x", spent=_usage(o=-2)),
            "spent.output_tokens",
            "INVALID_USAGE",
        ),
    ],
)
async def test_bad_settlements_and_leases_are_refused_precisely(metering, method, request_, field, reason):
    """Malformed budget calls are INVALID_ARGUMENT naming the field."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(metering.stub, method)(request_, metadata=metering.md(A))
    details = error_details(err.value)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (details["reason"], field in details["bad_request"]) == (reason, True)


async def test_concurrent_reservations_on_sqlite_never_overspend(metering):
    """The embedded store is exact too: 100 concurrent reservations of 10 against a budget of 250."""
    import asyncio

    await metering.stub.SetQuota(_quota(A, _tokens(250)), metadata=metering.op())

    async def reserve() -> bool:
        try:
            await _reserve(metering, 5, 5)
            return True
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return False

    granted = await asyncio.gather(*(reserve() for _ in range(100)))
    status, _ = await _status(metering)
    assert sum(granted) == 25 and status[pb.BUDGET_UNIT_TOKENS].held == 250


async def test_commit_after_the_period_ends_settles_the_period_it_was_reserved_in(metering):
    """A reservation made before midnight and committed after it charges the day it held budget in."""
    await metering.stub.SetQuota(_quota(A, _tokens(1000, period=pb.BUDGET_PERIOD_DAY)), metadata=metering.op())
    metering.clock.advance(12 * 3600 - 60)  # 23:59 on day one
    res = await _reserve(metering, 100, 0, ttl_seconds=600)
    metering.clock.advance(120)  # 00:01 on day two
    await metering.stub.CommitBudget(
        pb.CommitBudgetRequest(reservation_id=res.reservation_id, usage=_usage(i=80)), metadata=metering.md(A)
    )
    status, _ = await _status(metering)
    assert (status[pb.BUDGET_UNIT_TOKENS].used, status[pb.BUDGET_UNIT_TOKENS].held) == (0, 0)  # day two is fresh
    metering.clock.advance(-120)
    status, _ = await _status(metering)
    assert (status[pb.BUDGET_UNIT_TOKENS].used, status[pb.BUDGET_UNIT_TOKENS].held) == (80, 0)

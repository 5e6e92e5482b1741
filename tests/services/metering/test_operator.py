"""Operator RPCs: quotas, prices, cross-tenant reports and chargeback — operator-only and audited."""

from __future__ import annotations

from decimal import Decimal

import grpc
import pytest

from bulkhead.metering.v1 import metering_pb2 as pb
from services.metering import periods, store
from shared.errors import error_details

from .helpers import T0, day_range, event, price, ts

A, B = "t_alpha", "t_bravo"
DAY = periods.US_PER_DAY


def _operator_calls():
    return [
        ("SetQuota", pb.SetQuotaRequest(quota=pb.Quota(tenant_id=A, requests_per_minute=1))),
        ("GetQuota", pb.GetQuotaRequest(tenant_id=A)),
        ("QueryTenantUsage", pb.QueryTenantUsageRequest(tenant_id=A, filter=day_range())),
        ("ExportChargeback", pb.ExportChargebackRequest(tenant_id=A, start_time=ts(T0), end_time=ts(T0 + DAY))),
        ("SetPrice", pb.SetPriceRequest(price=price("m", T0, 1, 1))),
    ]


@pytest.mark.parametrize("name, request_", _operator_calls())
async def test_tenants_cannot_call_operator_rpcs(metering, name, request_):
    """A tenant token with every scope ('*') is refused every operator RPC."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(metering.stub, name)(request_, metadata=metering.md(B))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("name, request_", _operator_calls())
async def test_operator_scope_outside_the_platform_tenant_is_refused(metering, name, request_):
    """A token of an ordinary tenant that claims platform.operator is still refused."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(metering.stub, name)(request_, metadata=metering.md(B, scopes=("platform.operator",)))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_set_and_get_quota_round_trip_and_are_audited(metering):
    """SetQuota replaces the quota, GetQuota returns it, and both leave audit rows naming operator and tenant."""
    quota = pb.Quota(
        tenant_id=A,
        requests_per_minute=10,
        tokens_per_minute=2000,
        concurrent_calls=3,
        budgets=[
            pb.Budget(unit=pb.BUDGET_UNIT_TOKENS, limit=500, period=pb.BUDGET_PERIOD_DAY, mode=pb.BUDGET_MODE_SOFT),
            pb.Budget(unit=pb.BUDGET_UNIT_MICRO_USD, limit=7),
        ],
    )
    await metering.stub.SetQuota(pb.SetQuotaRequest(quota=quota), metadata=metering.op())
    got = (await metering.stub.GetQuota(pb.GetQuotaRequest(tenant_id=A), metadata=metering.op())).quota
    assert (got.requests_per_minute, got.tokens_per_minute, got.concurrent_calls) == (10, 2000, 3)
    assert sorted((b.unit, b.limit, b.period, b.mode) for b in got.budgets) == [
        (pb.BUDGET_UNIT_TOKENS, 500, pb.BUDGET_PERIOD_DAY, pb.BUDGET_MODE_SOFT),
        (pb.BUDGET_UNIT_MICRO_USD, 7, pb.BUDGET_PERIOD_MONTH, pb.BUDGET_MODE_HARD),
    ]
    # Replacing drops what is not named again.
    await metering.stub.SetQuota(
        pb.SetQuotaRequest(quota=pb.Quota(tenant_id=A, requests_per_minute=1)), metadata=metering.op()
    )
    got = (await metering.stub.GetQuota(pb.GetQuotaRequest(tenant_id=A), metadata=metering.op())).quota
    assert (got.requests_per_minute, list(got.budgets)) == (1, [])
    async with metering.service.db.system_session() as s:
        audit = [(r.operator_id, r.method, r.target_tenant) for r in await store.audit_entries(s)]
    assert audit == [
        ("p_operator", "SetQuota", A),
        ("p_operator", "GetQuota", A),
        ("p_operator", "SetQuota", A),
        ("p_operator", "GetQuota", A),
    ]


async def test_quota_for_one_tenant_does_not_touch_another(metering):
    """Setting A's quota leaves B without one."""
    await metering.stub.SetQuota(
        pb.SetQuotaRequest(quota=pb.Quota(tenant_id=A, requests_per_minute=5)), metadata=metering.op()
    )
    got = (await metering.stub.GetQuota(pb.GetQuotaRequest(tenant_id=B), metadata=metering.op())).quota
    assert (got.tenant_id, got.requests_per_minute) == (B, 0)


@pytest.mark.parametrize(
    "quota, field",
    [
        (pb.Quota(tenant_id=""), "quota.tenant_id"),
        (pb.Quota(tenant_id="alpha"), "quota.tenant_id"),
        (pb.Quota(tenant_id=A, requests_per_minute=-1), "quota.requests_per_minute"),
        (pb.Quota(tenant_id=A, budgets=[pb.Budget(limit=5)]), "quota.budgets[0].unit"),
        (pb.Quota(tenant_id=A, budgets=[pb.Budget(unit=pb.BUDGET_UNIT_TOKENS, limit=0)]), "quota.budgets[0].limit"),
        (
            pb.Quota(
                tenant_id=A,
                budgets=[
                    pb.Budget(unit=pb.BUDGET_UNIT_TOKENS, limit=1),
                    pb.Budget(unit=pb.BUDGET_UNIT_TOKENS, limit=2),
                ],
            ),
            "quota.budgets[1].unit",
        ),
    ],
)
async def test_bad_quotas_are_refused_and_change_nothing(metering, quota, field):
    """An invalid quota is INVALID_ARGUMENT naming the field; the old quota stays."""
    await metering.stub.SetQuota(
        pb.SetQuotaRequest(quota=pb.Quota(tenant_id=A, requests_per_minute=9)), metadata=metering.op()
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await metering.stub.SetQuota(pb.SetQuotaRequest(quota=quota), metadata=metering.op())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error_details(err.value)["bad_request"]
    got = (await metering.stub.GetQuota(pb.GetQuotaRequest(tenant_id=A), metadata=metering.op())).quota
    assert got.requests_per_minute == 9


async def test_operator_queries_one_tenant_or_all(metering):
    """QueryTenantUsage reads one named tenant, or every tenant split by tenant_id."""
    await metering.stub.RecordUsage(pb.RecordUsageRequest(events=[event("a", input_tokens=5)]), metadata=metering.md(A))
    await metering.stub.RecordUsage(pb.RecordUsageRequest(events=[event("b", input_tokens=7)]), metadata=metering.md(B))
    one = await metering.stub.QueryTenantUsage(
        pb.QueryTenantUsageRequest(tenant_id=B, filter=day_range()), metadata=metering.op()
    )
    assert [(r.tenant_id, r.tokens.input_tokens) for r in one.rows] == [(B, 7)]
    every = await metering.stub.QueryTenantUsage(pb.QueryTenantUsageRequest(filter=day_range()), metadata=metering.op())
    assert [(r.tenant_id, r.tokens.input_tokens) for r in every.rows] == [(A, 5), (B, 7)]
    async with metering.service.db.system_session() as s:
        targets = [r.target_tenant for r in await store.audit_entries(s) if r.method == "QueryTenantUsage"]
    assert targets == [B, "*"]


async def test_chargeback_lines_per_tenant_month_and_model(metering):
    """ExportChargeback gives exact cost lines per tenant, month and model, and their total."""
    await metering.stub.SetPrice(
        pb.SetPriceRequest(price=price("m1", T0 - 90 * DAY, 2_000_000, 10_000_000)), metadata=metering.op()
    )
    await metering.stub.RecordUsage(
        pb.RecordUsageRequest(
            events=[
                event("a1", model="m1", input_tokens=1000, output_tokens=100),
                event("a2", model="m1", at_us=T0 + 30 * DAY, input_tokens=500, output_tokens=0),
            ]
        ),
        metadata=metering.md(A),
    )
    b1 = event("b1", model="m1", input_tokens=1, output_tokens=0)
    await metering.stub.RecordUsage(pb.RecordUsageRequest(events=[b1]), metadata=metering.md(B))
    resp = await metering.stub.ExportChargeback(
        pb.ExportChargebackRequest(
            start_time=ts(T0 - 60 * DAY), end_time=ts(T0 + 60 * DAY), period=pb.CHARGEBACK_PERIOD_MONTH
        ),
        metadata=metering.op(),
    )
    lines = [
        (x.tenant_id, periods.to_datetime(x.period_start.ToMicroseconds()).month, x.model, x.cost_usd)
        for x in resp.lines
    ]
    assert lines == [(A, 3, "m1", "0.003"), (A, 4, "m1", "0.001"), (B, 3, "m1", "0.000002")]
    assert Decimal(resp.total_cost_usd) == Decimal("0.004002")


async def test_list_prices_is_open_to_tenants_and_paged(metering):
    """Tenants read the price table (platform-wide), a page at a time."""
    for i in range(3):
        await metering.stub.SetPrice(pb.SetPriceRequest(price=price("m", T0 + i, i, i)), metadata=metering.op())
    first = await metering.stub.ListPrices(pb.ListPricesRequest(page_size=2), metadata=metering.md(A))
    rest = await metering.stub.ListPrices(
        pb.ListPricesRequest(page_size=2, page_token=first.next_page_token), metadata=metering.md(A)
    )  # a token is the tenant's it was issued to
    assert [p.input_micros_per_mtok for p in (*first.prices, *rest.prices)] == [0, 1, 2]
    assert rest.next_page_token == ""


async def test_bad_price_is_refused(metering):
    """A price without a model or effective time, or with a negative rate, is refused field by field."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await metering.stub.SetPrice(
            pb.SetPriceRequest(price=pb.Price(input_micros_per_mtok=-1)), metadata=metering.op()
        )
    assert set(error_details(err.value)["bad_request"]) == {
        "price.model",
        "price.effective_time",
        "price.input_micros_per_mtok",
    }


async def test_operator_token_and_request_id_never_reach_the_logs(metering, caplog):
    """The audit log line names ids only: never the operator's bearer token."""
    md = metering.op()
    token = dict(md)["authorization"].removeprefix("Bearer ")
    with caplog.at_level("DEBUG"):
        await metering.stub.GetQuota(pb.GetQuotaRequest(tenant_id=A), metadata=md)
    assert "GetQuota" in caplog.text and token not in caplog.text


@pytest.mark.parametrize(
    "method, request_, field",
    [
        ("ExportChargeback", pb.ExportChargebackRequest(start_time=ts(T0)), "end_time"),
        (
            "ExportChargeback",
            pb.ExportChargebackRequest(tenant_id="x; drop", start_time=ts(T0), end_time=ts(T0 + 1)),
            "tenant_id",
        ),
        ("QueryTenantUsage", pb.QueryTenantUsageRequest(tenant_id="nope", filter=day_range()), "tenant_id"),
        ("QueryTenantUsage", pb.QueryTenantUsageRequest(filter=pb.UsageFilter(end_time=ts(T0))), "filter.start_time"),
        ("GetQuota", pb.GetQuotaRequest(), "tenant_id"),
    ],
)
async def test_bad_operator_requests_are_refused_precisely(metering, method, request_, field):
    """Operator calls with a bad tenant id or range fail with INVALID_ARGUMENT naming the field (no tenants yet)."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(metering.stub, method)(request_, metadata=metering.op())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error_details(err.value)["bad_request"]

"""RecordTenantUsage: a platform service records a named tenant's usage (the proxy's outbox path).
Only its platform scope opens it; the rows land in that tenant's data, once, filed by its tier."""

from __future__ import annotations

import grpc
import pytest

from bulkhead.common.v1 import tenancy_pb2
from bulkhead.metering.v1 import metering_pb2 as pb
from shared.errors import error_details

from .helpers import OPERATOR, day_range, event

A, B = "t_alpha", "t_bravo"
SERVICE_SCOPE = "platform.metering.record"


def _service(metering) -> tuple[tuple[str, str], ...]:
    return metering.tokens.metadata(OPERATOR, (SERVICE_SCOPE,), principal_id="p_svc_inference")


def _batch(tenant: str, keys, tier=tenancy_pb2.TIER_POOLED) -> pb.RecordTenantUsageRequest:
    return pb.RecordTenantUsageRequest(tenant_id=tenant, tier=tier, events=[event(k) for k in keys])


async def _events(metering, tenant: str) -> int:
    rows = (await metering.stub.QueryUsage(pb.QueryUsageRequest(filter=day_range()), metadata=metering.md(tenant))).rows
    return sum(r.event_count for r in rows)


async def test_a_platform_service_records_a_tenants_usage_once(metering):
    first = await metering.stub.RecordTenantUsage(_batch(A, ["o1", "o2"]), metadata=_service(metering))
    again = await metering.stub.RecordTenantUsage(_batch(A, ["o1", "o2"]), metadata=_service(metering))
    assert (first.recorded_count, first.duplicate_count) == (2, 0)
    assert (again.recorded_count, again.duplicate_count) == (0, 2)
    # The tenant's own RecordUsage of the same request ids is a duplicate too: one ledger, one key space.
    own = await metering.stub.RecordUsage(pb.RecordUsageRequest(events=[event("o1")]), metadata=metering.md(A))
    assert own.duplicate_count == 1
    assert await _events(metering, A) == 2
    assert await _events(metering, B) == 0


@pytest.mark.parametrize("who", ["tenant", "tenant_with_platform_scope", "operator"])
async def test_only_the_platform_service_scope_may_record_for_a_tenant(metering, who):
    md = {
        "tenant": metering.md(B),  # another tenant trying to bill (or pad) A's usage
        "tenant_with_platform_scope": metering.md(B, (SERVICE_SCOPE,)),
        "operator": metering.op(),
    }[who]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await metering.stub.RecordTenantUsage(_batch(A, ["x1"]), metadata=md)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await _events(metering, A) == 0


async def test_a_tier_other_than_the_tenants_own_is_refused(metering):
    await metering.stub.RecordUsage(pb.RecordUsageRequest(events=[event("own")]), metadata=metering.md(A))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await metering.stub.RecordTenantUsage(
            _batch(A, ["b1"], tier=tenancy_pb2.TIER_BRIDGE), metadata=_service(metering)
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(refused.value)["reason"] == "TIER_MISMATCH"
    assert await _events(metering, A) == 1


async def test_bad_input_is_refused_whole(metering):
    with pytest.raises(grpc.aio.AioRpcError) as no_tenant:
        await metering.stub.RecordTenantUsage(_batch("", ["e1"]), metadata=_service(metering))
    assert no_tenant.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    broken = _batch(A, ["ok", ""])  # an event without an idempotency key
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await metering.stub.RecordTenantUsage(broken, metadata=_service(metering))
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await _events(metering, A) == 0


async def test_an_unknown_tier_value_is_refused_not_filed_as_pooled(metering):
    """A tier enum value metering does not know is INVALID_TIER (it used to be filed as pooled)."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await metering.stub.RecordTenantUsage(_batch(A, ["u1"], tier=7), metadata=_service(metering))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(refused.value)["reason"] == "INVALID_TIER"
    assert error_details(refused.value)["bad_request"] == {"tier": "TIER_POOLED, TIER_BRIDGE or TIER_SILO"}
    assert await _events(metering, A) == 0


# ------------------------------------------------ ReleaseTenantLease (a suspended tenant's lease)


def _settle(tenant: str, lease_id: str, spent: int, tier=tenancy_pb2.TIER_POOLED) -> pb.ReleaseTenantLeaseRequest:
    return pb.ReleaseTenantLeaseRequest(
        tenant_id=tenant, tier=tier, lease_id=lease_id, spent=pb.TokenCounts(input_tokens=spent)
    )


async def _leased(metering, tenant: str, limit: int = 1000, tokens: int = 600) -> str:
    quota = pb.Quota(
        tenant_id=tenant,
        budgets=[
            pb.Budget(unit=pb.BUDGET_UNIT_TOKENS, limit=limit, mode=pb.BUDGET_MODE_HARD, period=pb.BUDGET_PERIOD_MONTH)
        ],
    )
    await metering.stub.SetQuota(pb.SetQuotaRequest(quota=quota), metadata=metering.op())
    lease = await metering.stub.LeaseBudget(
        pb.LeaseBudgetRequest(model="claude-test", tokens=tokens), metadata=metering.md(tenant)
    )
    return lease.lease.lease_id


async def _budget(metering, tenant: str) -> tuple[int, int]:
    status = await metering.stub.GetQuotaStatus(pb.GetQuotaStatusRequest(), metadata=metering.md(tenant))
    return status.budgets[0].used, status.budgets[0].held


async def test_a_platform_service_settles_a_tenants_lease_once(metering):
    """The spend is charged, the rest returned; settling again changes nothing."""
    lease_id = await _leased(metering, A)
    done = await metering.stub.ReleaseTenantLease(_settle(A, lease_id, 250), metadata=_service(metering))
    assert (done.charged.tokens, done.released.tokens) == (250, 350)
    await metering.stub.ReleaseTenantLease(_settle(A, lease_id, 250), metadata=_service(metering))
    assert await _budget(metering, A) == (250, 0)


async def test_another_tenants_lease_id_is_not_found_and_untouched(metering):
    """Naming B's lease under tenant A answers like a random id, and B's lease stays held."""
    lease_b = await _leased(metering, B)
    await _leased(metering, A)
    replies = []
    for lease_id in (lease_b, "lease_doesnotexist000000000"):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await metering.stub.ReleaseTenantLease(_settle(A, lease_id, 1), metadata=_service(metering))
        replies.append((refused.value.code(), error_details(refused.value)["reason"]))
    assert replies[0] == replies[1] and replies[0][0] == grpc.StatusCode.NOT_FOUND
    assert await _budget(metering, B) == (0, 600)


@pytest.mark.parametrize("who", ["tenant", "tenant_with_platform_scope", "operator"])
async def test_only_the_platform_service_scope_may_settle_a_tenants_lease(metering, who):
    lease_id = await _leased(metering, A)
    md = {
        "tenant": metering.md(A),
        "tenant_with_platform_scope": metering.md(B, (SERVICE_SCOPE,)),
        "operator": metering.op(),
    }[who]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await metering.stub.ReleaseTenantLease(_settle(A, lease_id, 1), metadata=md)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await _budget(metering, A) == (0, 600)


@pytest.mark.parametrize(
    ("tenant", "tier", "code", "reason"),
    [
        ("", tenancy_pb2.TIER_POOLED, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TENANT_ID"),
        ("not-a-tenant", tenancy_pb2.TIER_POOLED, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TENANT_ID"),
        (A, 7, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TIER"),
        (A, tenancy_pb2.TIER_SILO, grpc.StatusCode.FAILED_PRECONDITION, "TIER_MISMATCH"),
    ],
)
async def test_bad_settlement_input_is_refused_and_leaves_the_lease_held(metering, tenant, tier, code, reason):
    lease_id = await _leased(metering, A)
    await metering.stub.RecordUsage(pb.RecordUsageRequest(events=[event("known")]), metadata=metering.md(A))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await metering.stub.ReleaseTenantLease(_settle(tenant, lease_id, 1, tier=tier), metadata=_service(metering))
    assert (refused.value.code(), error_details(refused.value)["reason"]) == (code, reason)
    assert await _budget(metering, A) == (0, 600)

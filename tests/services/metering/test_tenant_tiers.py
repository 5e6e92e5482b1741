"""An operator's quota for a bridge or silo tenant metering has not seen yet lands where that
tenant's own reservations look (its tier asked of identity), so the budget is enforced."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from bulkhead.common.v1 import tenancy_pb2
from bulkhead.metering.v1 import metering_pb2 as pb
from bulkhead.metering.v1 import metering_pb2_grpc
from services.metering.server import MIGRATIONS, serve_metering
from shared.client import make_channel
from shared.db import Database
from shared.errors import error_details
from shared.tiers import IdentityTiers
from testkit.identity import running_identity


def _hard_tokens(tenant_id: str, limit: int) -> pb.SetQuotaRequest:
    return pb.SetQuotaRequest(
        quota=pb.Quota(
            tenant_id=tenant_id,
            budgets=[
                pb.Budget(
                    unit=pb.BUDGET_UNIT_TOKENS, limit=limit, mode=pb.BUDGET_MODE_HARD, period=pb.BUDGET_PERIOD_MONTH
                )
            ],
        )
    )


@pytest.mark.parametrize("tier", [tenancy_pb2.TIER_BRIDGE, tenancy_pb2.TIER_SILO])
async def test_quota_set_before_the_tenants_first_call_is_enforced(tmp_path: Path, tier: int) -> None:
    async with running_identity(tmp_path / "identity") as identity:
        keys = make_channel(identity.address)
        lookups = make_channel(identity.address, forward=True)
        verifier = identity.verifier(keys, service="metering")
        db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'metering.db'}", migrations=str(MIGRATIONS))
        service = await serve_metering(db=db, verifier=verifier, tiers=IdentityTiers(lookups))
        channel = make_channel(service.running.address)
        try:
            stub = metering_pb2_grpc.MeteringServiceStub(channel)
            tenant = await identity.tenant(tier=tier)
            await stub.SetQuota(_hard_tokens(tenant.tenant_id, 500), metadata=identity.operator.metadata)

            status = await stub.GetQuotaStatus(pb.GetQuotaStatusRequest(), metadata=tenant.metadata)
            assert [b.budget.limit for b in status.budgets] == [500]  # the tenant sees its own quota
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ReserveBudget(
                    pb.ReserveBudgetRequest(model="claude-test", prompt_tokens=400, max_output_tokens=200),
                    metadata=tenant.metadata,
                )
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_details(refused.value)["reason"] == "BUDGET_EXHAUSTED"

            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await stub.SetQuota(_hard_tokens("t_nosuchtenant", 500), metadata=identity.operator.metadata)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            await channel.close()
            await service.stop(0)
            await verifier.close()
            await keys.close()
            await lookups.close()

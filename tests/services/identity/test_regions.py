"""identity places each tenant in a data-residency region: validated at CreateTenant, answered to
platform services only (GetTenantPlacement), which route the tenant's rows by it."""

from __future__ import annotations

import grpc
import pytest

from bulkhead.common.v1 import tenancy_pb2
from bulkhead.identity.v1 import identity_pb2 as pb
from shared.errors import error_details
from testkit.identity import running_identity

REGIONS = {"BULKHEAD_REGIONS": "us,eu", "BULKHEAD_DEFAULT_REGION": "us"}


async def _error(coro) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    return info.value


@pytest.fixture
async def regional(tmp_path):
    async with running_identity(tmp_path, env=REGIONS) as harness:
        yield harness


async def test_tenant_gets_the_region_asked_for_or_the_default(regional):
    op = regional.operator.metadata
    eu = await regional.stub.CreateTenant(pb.CreateTenantRequest(name="acme-eu", region="eu"), metadata=op)
    plain = await regional.stub.CreateTenant(pb.CreateTenantRequest(name="acme-us"), metadata=op)
    assert (eu.tenant.region, plain.tenant.region) == ("eu", "us")


@pytest.mark.parametrize("region", ["mars", "EU", "local", "eu ", "x" * 300, "eu\x00"])
async def test_unknown_region_is_refused_naming_the_known_ones(regional, region):
    """Nothing is created: the name stays free; the message lists the configured regions."""
    err = await _error(
        regional.stub.CreateTenant(
            pb.CreateTenantRequest(name="nowhere", region=region), metadata=regional.operator.metadata
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error_details(err)
    assert details["reason"] == "UNKNOWN_REGION" and "us, eu" in err.details()
    assert details["bad_request"] == {"region": "one of: us, eu"}
    assert len(err.details()) < 200  # a long region is clipped, not echoed
    ok = await regional.stub.CreateTenant(
        pb.CreateTenantRequest(name="nowhere", region="eu"), metadata=regional.operator.metadata
    )
    assert ok.tenant.region == "eu"


async def test_single_region_deployment_accepts_only_its_default(tmp_path):
    async with running_identity(tmp_path) as identity:
        op = identity.operator.metadata
        made = await identity.stub.CreateTenant(pb.CreateTenantRequest(name="plain"), metadata=op)
        assert made.tenant.region == "local"
        err = await _error(identity.stub.CreateTenant(pb.CreateTenantRequest(name="far", region="eu"), metadata=op))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "local" in err.details()


async def test_placement_is_answered_to_platform_services_only(regional):
    op = regional.operator.metadata
    created = await regional.stub.CreateTenant(
        pb.CreateTenantRequest(name="placed", region="eu", tier=tenancy_pb2.TIER_SILO), metadata=op
    )
    tid = created.tenant.id
    service = await regional.login(regional.service_key_file("state").read_text().strip())
    reply = await regional.stub.GetTenantPlacement(
        pb.GetTenantPlacementRequest(tenant_id=tid), metadata=service.metadata
    )
    assert (reply.tenant_id, reply.tier, reply.region) == (tid, tenancy_pb2.TIER_SILO, "eu")

    admin = await regional.login(created.admin_api_key)  # the tenant itself, even about itself
    for md in (admin.metadata, op):
        err = await _error(regional.stub.GetTenantPlacement(pb.GetTenantPlacementRequest(tenant_id=tid), metadata=md))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and error_details(err)["reason"] == "MISSING_SCOPE"
    err = await _error(regional.stub.GetTenantPlacement(pb.GetTenantPlacementRequest(tenant_id=tid)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED

    missing = await _error(
        regional.stub.GetTenantPlacement(pb.GetTenantPlacementRequest(tenant_id="t_nobody"), metadata=service.metadata)
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND and error_details(missing)["reason"] == "TENANT_NOT_FOUND"
    empty = await _error(regional.stub.GetTenantPlacement(pb.GetTenantPlacementRequest(), metadata=service.metadata))
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tenant_id" in error_details(empty)["bad_request"]

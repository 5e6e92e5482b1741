"""Identity checks every tenant id a request names with the one rule (shared.ids): a malformed id is
INVALID_ARGUMENT INVALID_TENANT_ID, for operators and tenants alike, before anything is looked up."""

from __future__ import annotations

import grpc
import pytest

from bulkhead.identity.v1 import identity_pb2 as pb
from shared.errors import error_details
from testkit.identity import running_identity

MALFORMED = ["t_a_b", "T_A", "t_", "x", "t_" + "a" * 61, "t_a\u00e9"]


@pytest.fixture
async def identity(tmp_path):
    async with running_identity(tmp_path) as harness:
        yield harness


async def test_malformed_tenant_ids_are_refused_precisely(identity):
    acme = await identity.tenant("acme")
    stub = identity.stub
    calls = {
        "GetTenant": lambda t: stub.GetTenant(pb.GetTenantRequest(tenant_id=t), metadata=identity.operator.metadata),
        "GetTenant (tenant)": lambda t: stub.GetTenant(pb.GetTenantRequest(tenant_id=t), metadata=acme.metadata),
        "GetDeletionReceipt": lambda t: stub.GetDeletionReceipt(
            pb.GetDeletionReceiptRequest(tenant_id=t), metadata=identity.operator.metadata
        ),
        "GetMigration": lambda t: stub.GetMigration(
            pb.GetMigrationRequest(tenant_id=t), metadata=identity.operator.metadata
        ),
        "UpdateTenantStatus": lambda t: stub.UpdateTenantStatus(
            pb.UpdateTenantStatusRequest(tenant_id=t, status=pb.TENANT_STATUS_SUSPENDED),
            metadata=identity.operator.metadata,
        ),
        "SetRetentionPolicy": lambda t: stub.SetRetentionPolicy(
            pb.SetRetentionPolicyRequest(tenant_id=t, audit_days=30), metadata=identity.operator.metadata
        ),
        "GetRetentionPolicy (tenant)": lambda t: stub.GetRetentionPolicy(
            pb.GetRetentionPolicyRequest(tenant_id=t), metadata=acme.metadata
        ),
    }
    for name, call in calls.items():
        for tenant_id in MALFORMED:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(tenant_id)
            got = (info.value.code(), error_details(info.value)["reason"])
            assert got == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TENANT_ID"), (name, tenant_id, got)
    # A well-formed id of no tenant is still simply not found (nothing says which ids exist).
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetTenant(pb.GetTenantRequest(tenant_id="t_nosuchtenant"), metadata=identity.operator.metadata)
    assert error_details(info.value)["reason"] == "TENANT_NOT_FOUND"
    # The tenant's own id, given or not, still answers.
    own = await stub.GetTenant(pb.GetTenantRequest(tenant_id=acme.tenant_id), metadata=acme.metadata)
    assert own.tenant.id == acme.tenant_id

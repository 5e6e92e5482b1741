"""An operator's model policy for a bridge or silo tenant is the policy that tenant's own calls obey.

The proxy learns the tenant's tier from identity (as metering does) and writes the policy where
the tenant's own calls read it: its own schema, database or file, never the pooled tables.
Everything here runs against a real identity, whose tokens every service of the mesh verifies.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import pytest

from bulkhead.common.v1 import tenancy_pb2
from bulkhead.inference.v1 import inference_pb2 as pb
from services.inference.server import MIGRATIONS
from shared.client import make_channel
from shared.db import Database
from shared.errors import error_details
from testkit.identity import IdentityHarness, running_identity

from .helpers import MODEL, Mesh, params, start_mesh, stop_mesh

NARROW = pb.ModelPolicy(allowed_models=["claude-other"], default_model="claude-other", max_tokens_ceiling=20)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def tiered(request, tmp_path, db_templates) -> AsyncIterator[tuple[Mesh, IdentityHarness]]:
    """The mesh behind a real identity, its proxy on SQLite or Postgres (app role, RLS, owner-made tiers)."""
    async with running_identity(tmp_path / "identity") as identity:
        keys = make_channel(identity.address)
        verifier = identity.verifier(keys, service="inference")
        mesh = await start_mesh(tmp_path, proxies=0, templates=db_templates, verifier=verifier)
        mesh.env_overrides["BULKHEAD_IDENTITY_ADDR"] = identity.address
        mesh.tiers = None  # the proxies ask identity, wired as in production
        try:
            # Two replicas over one database: what one writes, the other must read (its cache is cold).
            if request.param == "postgres":
                urls = await request.getfixturevalue("postgres").create_database(f"inf_tiers_{uuid.uuid4().hex[:8]}")
                for _ in range(2):
                    db = await Database.open(urls.app_url, migrations=str(MIGRATIONS), owner_url=urls.owner_url)
                    await mesh.start_proxy(db=db)
            else:
                for _ in range(2):
                    await mesh.start_proxy()
            yield mesh, identity
        finally:
            await stop_mesh(mesh)
            await verifier.close()
            await keys.close()


async def _refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def test_operator_policy_for_bridge_and_silo_tenants_is_what_their_calls_obey(tiered):
    """SetModelPolicy for a bridge and a silo tenant: each tenant's own GetModelPolicy and CreateMessage obey it."""
    mesh, identity = tiered
    setter, other = (p.stub for p in mesh.proxies)
    for tier in (tenancy_pb2.TIER_BRIDGE, tenancy_pb2.TIER_SILO):
        tenant = await identity.tenant(tier=tier)
        name = tenancy_pb2.Tier.Name(tier)
        # The tenant calls first on the setter's replica, so a policy it cached before the change would show.
        await setter.CreateMessage(pb.CreateMessageRequest(params=params(model=MODEL)), metadata=tenant.metadata)
        await setter.SetModelPolicy(
            pb.SetModelPolicyRequest(tenant_id=tenant.tenant_id, policy=NARROW), metadata=identity.operator.metadata
        )

        for stub in (other, setter):  # the other replica reads the database; the setter its refreshed cache
            got = await stub.GetModelPolicy(pb.GetModelPolicyRequest(), metadata=tenant.metadata)
            assert (list(got.policy.allowed_models), got.policy.max_tokens_ceiling) == (["claude-other"], 20), name
            err = await _refused(
                stub.CreateMessage(pb.CreateMessageRequest(params=params(model=MODEL)), metadata=tenant.metadata)
            )
            assert (err.code(), error_details(err)["reason"]) == (
                grpc.StatusCode.PERMISSION_DENIED,
                "MODEL_NOT_ALLOWED",
            ), name
            ok = await stub.CreateMessage(
                pb.CreateMessageRequest(params=params(model="", max_tokens=10)), metadata=tenant.metadata
            )
            assert ok.call.resolved_model == "claude-other", name

    pooled = await identity.tenant()  # the pooled tables were not touched: a pooled tenant keeps the platform's
    got = await other.GetModelPolicy(pb.GetModelPolicyRequest(), metadata=pooled.metadata)
    assert MODEL in got.policy.allowed_models and got.policy.max_tokens_ceiling == 1000


async def test_operator_policy_for_an_unknown_tenant_is_not_found(tiered):
    """A tenant identity does not know gets NOT_FOUND (not a policy filed under a guessed tier)."""
    mesh, identity = tiered
    err = await _refused(
        mesh.proxies[0].stub.SetModelPolicy(
            pb.SetModelPolicyRequest(tenant_id="t_nosuchtenant", policy=NARROW), metadata=identity.operator.metadata
        )
    )
    assert (err.code(), error_details(err)["reason"]) == (grpc.StatusCode.NOT_FOUND, "TENANT_NOT_FOUND")

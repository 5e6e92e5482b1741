"""The typed Python client: stubs by service, and tokens renewed before they expire."""

from __future__ import annotations

import asyncio

from bulkhead.client import Client
from bulkhead.identity.v1 import identity_pb2 as pb
from testkit.identity import running_identity


async def test_client_renews_token_before_expiry(tmp_path):
    """With a token close to expiry the client fetches a new one before the call, transparently."""
    async with running_identity(tmp_path) as identity:
        tenant = await identity.tenant()
        client = await Client.connect(api_key=tenant.api_key, ttl_seconds=61, addresses={"identity": identity.address})
        async with client:
            first = await client.identity.GetTenant(pb.GetTenantRequest())
            assert first.tenant.id == tenant.tenant_id and client.auth.refreshes == 1
            await asyncio.sleep(1.2)  # now less than the 60 s refresh margin is left
            await client.identity.GetTenant(pb.GetTenantRequest())
            assert client.auth.refreshes == 2

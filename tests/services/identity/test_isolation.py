"""Every identity RPC, called with tenant A's token on tenant B's resources: denied, and nothing leaks."""

from __future__ import annotations

import grpc
import pytest

from bulkhead.identity.v1 import identity_pb2 as pb


async def _error(coro) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    return info.value


@pytest.fixture
async def two_tenants(identity):
    """Tenants A and B, B with a principal, a key and a live token."""
    a, b = await identity.tenant(), await identity.tenant()
    principal = (
        await identity.stub.CreatePrincipal(
            pb.CreatePrincipalRequest(kind=pb.PRINCIPAL_KIND_AGENT, display_name="b-bot", scopes=["state.*"]),
            metadata=b.metadata,
        )
    ).principal
    key = await identity.stub.CreateApiKey(pb.CreateApiKeyRequest(principal_id=principal.id), metadata=b.metadata)
    return a, b, principal, key


async def test_get_tenant_of_another_is_not_found(identity, two_tenants):
    """GetTenant(B) with A's token: NOT_FOUND, exactly as for a tenant that does not exist."""
    a, b, _, _ = two_tenants
    real = await _error(identity.stub.GetTenant(pb.GetTenantRequest(tenant_id=b.tenant_id), metadata=a.metadata))
    ghost = await _error(identity.stub.GetTenant(pb.GetTenantRequest(tenant_id="t_doesnotexist"), metadata=a.metadata))
    assert real.code() == ghost.code() == grpc.StatusCode.NOT_FOUND
    assert real.details() == ghost.details()


async def test_principals_of_another_tenant_are_invisible(identity, two_tenants):
    """Get, list and disable of B's principal from A: NOT_FOUND or absent, same as a made-up id."""
    a, _, principal, _ = two_tenants
    for call in (
        identity.stub.GetPrincipal(pb.GetPrincipalRequest(principal_id=principal.id), metadata=a.metadata),
        identity.stub.DisablePrincipal(pb.DisablePrincipalRequest(principal_id=principal.id), metadata=a.metadata),
    ):
        err = await _error(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND and principal.id not in err.details()
    ghost = await _error(identity.stub.GetPrincipal(pb.GetPrincipalRequest(principal_id="p_nope"), metadata=a.metadata))
    assert ghost.details() == "principal not found"
    listed = await identity.stub.ListPrincipals(pb.ListPrincipalsRequest(page_size=500), metadata=a.metadata)
    assert principal.id not in [p.id for p in listed.principals]
    assert {p.display_name for p in listed.principals} == {"admin"}


async def test_principal_of_b_stays_enabled_after_a_tries(identity, two_tenants):
    """A's failed DisablePrincipal left B's principal untouched."""
    a, b, principal, _ = two_tenants
    await _error(
        identity.stub.DisablePrincipal(pb.DisablePrincipalRequest(principal_id=principal.id), metadata=a.metadata)
    )
    got = await identity.stub.GetPrincipal(pb.GetPrincipalRequest(principal_id=principal.id), metadata=b.metadata)
    assert not got.principal.disabled


async def test_api_keys_of_another_tenant_are_invisible(identity, two_tenants):
    """A cannot list, revoke, or create a key for B's principal; B's key keeps working."""
    a, _, principal, key = two_tenants
    listed = await identity.stub.ListApiKeys(pb.ListApiKeysRequest(principal_id=principal.id), metadata=a.metadata)
    assert list(listed.api_keys) == []
    everything = await identity.stub.ListApiKeys(pb.ListApiKeysRequest(page_size=500), metadata=a.metadata)
    assert key.api_key.id not in [k.id for k in everything.api_keys]
    err = await _error(
        identity.stub.RevokeApiKey(pb.RevokeApiKeyRequest(api_key_id=key.api_key.id), metadata=a.metadata)
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = await _error(
        identity.stub.CreateApiKey(pb.CreateApiKeyRequest(principal_id=principal.id), metadata=a.metadata)
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert (await identity.login(key.secret)).tenant_id != a.tenant_id


async def test_tokens_of_another_tenant_cannot_be_revoked(identity, two_tenants):
    """RevokeToken of B's jti from A: NOT_FOUND, and B's token still works."""
    a, b, _, _ = two_tenants
    err = await _error(identity.stub.RevokeToken(pb.RevokeTokenRequest(jti=b.jti), metadata=a.metadata))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert (await identity.stub.GetTenant(pb.GetTenantRequest(), metadata=b.metadata)).tenant.id == b.tenant_id


async def test_exchange_stays_inside_the_callers_tenant(identity, two_tenants):
    """An exchanged token is always for the caller's own tenant, whatever metadata is sent."""
    a, b, _, _ = two_tenants
    resp = await identity.stub.ExchangeToken(
        pb.ExchangeTokenRequest(scopes=["identity.tenants.read"], agent_id="x"), metadata=a.metadata
    )
    spoofed = (("authorization", f"Bearer {resp.token}"), ("x-tenant-id", b.tenant_id))
    err = await _error(identity.stub.GetTenant(pb.GetTenantRequest(), metadata=spoofed))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    mine = (("authorization", f"Bearer {resp.token}"), ("x-tenant-id", a.tenant_id))
    assert (await identity.stub.GetTenant(pb.GetTenantRequest(), metadata=mine)).tenant.id == a.tenant_id

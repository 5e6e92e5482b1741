"""identity: tenants, principals and API keys, and that no tenant sees another's."""

from __future__ import annotations

import os
import stat

import grpc
import pytest

from bulkhead.common.v1 import tenancy_pb2
from bulkhead.identity.v1 import identity_pb2 as pb
from shared.errors import error_details


async def _error(coro) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    return info.value


async def test_first_start_writes_operator_key_once(sqlite_identity, tmp_path):
    """The operator key file is 0600 and holds a key that works; a restart does not make another."""
    path = tmp_path / "operator.key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sqlite_identity.app.operator_key == path.read_text().strip()
    from testkit.identity import running_identity

    await sqlite_identity.app.close(0)
    async with running_identity(tmp_path) as again:
        assert again.app.operator_key is None
        assert again.operator.tenant_id == "t_platform"


async def test_operator_creates_tenant_whose_admin_key_works(identity):
    """CreateTenant returns an admin key that issues a token for exactly that tenant."""
    created = await identity.stub.CreateTenant(
        pb.CreateTenantRequest(name="acme", tier=tenancy_pb2.TIER_BRIDGE, region="eu-west"),
        metadata=identity.operator.metadata,
    )
    assert created.tenant.tier == tenancy_pb2.TIER_BRIDGE and created.tenant.status == pb.TENANT_STATUS_ACTIVE
    admin = await identity.login(created.admin_api_key)
    assert admin.tenant_id == created.tenant.id
    own = await identity.stub.GetTenant(pb.GetTenantRequest(), metadata=admin.metadata)
    assert own.tenant.name == "acme" and own.tenant.region == "eu-west"


async def test_tenant_admin_cannot_create_or_list_tenants(identity):
    """Tenant management needs the platform operator scope, which '*' in a tenant never grants."""
    a = await identity.tenant()
    err = await _error(identity.stub.CreateTenant(pb.CreateTenantRequest(name="evil"), metadata=a.metadata))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await _error(identity.stub.ListTenants(pb.ListTenantsRequest(), metadata=a.metadata))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await _error(
        identity.stub.UpdateTenantStatus(
            pb.UpdateTenantStatusRequest(tenant_id=a.tenant_id, status=pb.TENANT_STATUS_SUSPENDED), metadata=a.metadata
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await _error(identity.stub.RotateSigningKey(pb.RotateSigningKeyRequest(), metadata=a.metadata))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_bad_tenant_input_is_invalid_argument(identity):
    """Bad names, duplicates and malformed page tokens get precise statuses; nothing is created."""
    op = identity.operator.metadata
    err = await _error(identity.stub.CreateTenant(pb.CreateTenantRequest(name="Bad Name!"), metadata=op))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "name" in error_details(err)["bad_request"]
    await identity.stub.CreateTenant(pb.CreateTenantRequest(name="dupe"), metadata=op)
    err = await _error(identity.stub.CreateTenant(pb.CreateTenantRequest(name="dupe"), metadata=op))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    err = await _error(identity.stub.ListTenants(pb.ListTenantsRequest(page_token="%%%"), metadata=op))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and error_details(err)["reason"] == "INVALID_PAGE_TOKEN"
    import base64
    import json

    foreign = base64.urlsafe_b64encode(json.dumps({"offset": 10}).encode()).decode()  # an unsigned position
    err = await _error(identity.stub.ListTenants(pb.ListTenantsRequest(page_token=foreign), metadata=op))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and error_details(err)["reason"] == "INVALID_PAGE_TOKEN"
    listed = await identity.stub.ListTenants(pb.ListTenantsRequest(page_size=500), metadata=op)
    assert [t.name for t in listed.tenants].count("dupe") == 1 and "Bad Name!" not in [t.name for t in listed.tenants]


async def test_list_tenants_pages_through_all(identity):
    """Paging with page_size 2 visits every tenant once."""
    op = identity.operator.metadata
    for i in range(5):
        await identity.stub.CreateTenant(pb.CreateTenantRequest(name=f"page-{i}"), metadata=op)
    seen, token = [], ""
    while True:
        resp = await identity.stub.ListTenants(pb.ListTenantsRequest(page_size=2, page_token=token), metadata=op)
        seen += [t.name for t in resp.tenants]
        token = resp.next_page_token
        if not token:
            break
    assert sorted(n for n in seen if n.startswith("page-")) == [f"page-{i}" for i in range(5)]
    assert len(seen) == len(set(seen))


async def test_suspended_tenant_gets_no_tokens(identity):
    """A suspended tenant's key is refused with PERMISSION_DENIED; reactivating restores it."""
    a = await identity.tenant()
    op = identity.operator.metadata
    await identity.stub.UpdateTenantStatus(
        pb.UpdateTenantStatusRequest(tenant_id=a.tenant_id, status=pb.TENANT_STATUS_SUSPENDED), metadata=op
    )
    err = await _error(identity.login(a.api_key))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and error_details(err)["reason"] == "TENANT_SUSPENDED"
    await identity.stub.UpdateTenantStatus(
        pb.UpdateTenantStatusRequest(tenant_id=a.tenant_id, status=pb.TENANT_STATUS_ACTIVE), metadata=op
    )
    assert (await identity.login(a.api_key)).tenant_id == a.tenant_id


async def test_principals_and_keys_lifecycle(identity):
    """A principal gets a key with narrower scopes; the key is shown once, listed by prefix, and revocable."""
    a = await identity.tenant()
    bot = (
        await identity.stub.CreatePrincipal(
            pb.CreatePrincipalRequest(
                kind=pb.PRINCIPAL_KIND_AGENT, display_name="triage-bot", scopes=["state.*", "inference.*"]
            ),
            metadata=a.metadata,
        )
    ).principal
    created = await identity.stub.CreateApiKey(
        pb.CreateApiKeyRequest(principal_id=bot.id, scopes=["state.threads.read"], display_name="ci"),
        metadata=a.metadata,
    )
    assert created.secret.startswith(created.api_key.prefix) and len(created.secret) > len(created.api_key.prefix) + 20
    listed = await identity.stub.ListApiKeys(pb.ListApiKeysRequest(principal_id=bot.id), metadata=a.metadata)
    assert [k.id for k in listed.api_keys] == [created.api_key.id]
    assert created.secret not in str(listed)
    bot_login = await identity.login(created.secret)
    assert bot_login.tenant_id == a.tenant_id
    err = await _error(identity.login(created.secret, scopes=("state.threads.write",)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    await identity.stub.RevokeApiKey(pb.RevokeApiKeyRequest(api_key_id=created.api_key.id), metadata=a.metadata)
    err = await _error(identity.login(created.secret))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and error_details(err)["reason"] == "API_KEY_REVOKED"


async def test_scopes_cannot_escalate(identity):
    """A principal cannot be given more than its creator holds, nor platform scopes."""
    a = await identity.tenant()
    narrow = (
        await identity.stub.CreatePrincipal(
            pb.CreatePrincipalRequest(
                kind=pb.PRINCIPAL_KIND_SERVICE_ACCOUNT, display_name="narrow", scopes=["identity.*"]
            ),
            metadata=a.metadata,
        )
    ).principal
    key = await identity.stub.CreateApiKey(pb.CreateApiKeyRequest(principal_id=narrow.id), metadata=a.metadata)
    narrow_login = await identity.login(key.secret)
    err = await _error(
        identity.stub.CreatePrincipal(
            pb.CreatePrincipalRequest(kind=pb.PRINCIPAL_KIND_AGENT, display_name="wider", scopes=["credentials.*"]),
            metadata=narrow_login.metadata,
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and error_details(err)["reason"] == "SCOPE_ESCALATION"
    err = await _error(
        identity.stub.CreatePrincipal(
            pb.CreatePrincipalRequest(kind=pb.PRINCIPAL_KIND_AGENT, display_name="op", scopes=["platform.operator"]),
            metadata=a.metadata,
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await _error(
        identity.stub.CreatePrincipal(
            pb.CreatePrincipalRequest(kind=pb.PRINCIPAL_KIND_AGENT, display_name="bad", scopes=["NOT A SCOPE"]),
            metadata=a.metadata,
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_bad_api_keys_are_unauthenticated_alike(identity):
    """Garbage, a wrong secret, and a key id moved to another tenant all get the same answer."""
    a, b = await identity.tenant(), await identity.tenant()
    from services.identity.credentials import parse_api_key

    parsed = parse_api_key(a.api_key)
    moved = f"bk_{b.tenant_id}_{parsed.key_id}_{parsed.secret}"
    wrong_secret = a.api_key[:-4] + ("0000" if not a.api_key.endswith("0000") else "1111")
    messages = set()
    for bad in ("nonsense", wrong_secret, moved):
        err = await _error(identity.login(bad))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        messages.add(err.details())
    assert len(messages) == 1


async def test_ttl_bounds(identity):
    """ttl above the ceiling is INVALID_ARGUMENT; a short ttl is honoured."""
    a = await identity.tenant()
    err = await _error(identity.stub.IssueToken(pb.IssueTokenRequest(api_key=a.api_key, ttl_seconds=999_999)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    resp = await identity.stub.IssueToken(pb.IssueTokenRequest(api_key=a.api_key, ttl_seconds=60))
    import time

    assert resp.expire_time.seconds - time.time() <= 61


async def test_first_start_writes_a_narrow_service_key_for_the_proxy_once(sqlite_identity, tmp_path, caplog):
    """identity makes the inference proxy's platform key: 0600, scopes platform.identity.verify and
    platform.metering.record and nothing else (not even the operator's), kept across restarts, and a new key
    for the same principal if deleted."""
    import jwt

    from testkit.identity import running_identity

    path = tmp_path / "service-keys" / "inference.key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    key = path.read_text().strip()
    service = await sqlite_identity.login(key)
    claims = jwt.decode(service.token, options={"verify_signature": False})
    assert (service.tenant_id, claims["scope"]) == ("t_platform", "platform.identity.verify platform.metering.record")
    denied = await _error(
        sqlite_identity.stub.CreateTenant(pb.CreateTenantRequest(name="x"), metadata=service.metadata)
    )
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED

    await sqlite_identity.app.close(0)
    async with running_identity(tmp_path):
        assert path.read_text().strip() == key
    path.unlink()
    caplog.set_level("INFO", logger="bulkhead.identity")
    async with running_identity(tmp_path) as again:
        new_key = path.read_text().strip()
        assert new_key != key
        assert "created the inference service key" in caplog.text and new_key not in caplog.text  # path, never key
        principals = await again.stub.ListPrincipals(pb.ListPrincipalsRequest(), metadata=again.operator.metadata)
        assert [p.display_name for p in principals.principals].count("svc-inference") == 1

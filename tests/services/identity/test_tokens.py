"""Token exchange, revocation and signing-key rotation, as seen by another service's interceptor."""

from __future__ import annotations

import asyncio
import time

import grpc
import jwt
import pytest

from bulkhead.identity.v1 import identity_pb2 as pb
from bulkhead.testing.v1 import echo_pb2, echo_pb2_grpc
from shared.errors import error_details
from shared.server import serve
from testkit.echo import echo_binding


async def _error(coro) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    return info.value


@pytest.fixture
async def downstream(sqlite_identity):
    """Another service (echo) whose interceptor learns keys and revocations from identity over gRPC."""
    channel = grpc.aio.insecure_channel(sqlite_identity.address)
    verifier = sqlite_identity.verifier(channel)
    running = await serve(name="echo", bindings=[echo_binding()], verifier=verifier)
    client = grpc.aio.insecure_channel(running.address)
    yield echo_pb2_grpc.EchoServiceStub(client)
    await client.close()
    await running.stop(0)
    await verifier._keys.close()
    await channel.close()


def _md(token: str, tenant: str):
    return (("authorization", f"Bearer {token}"), ("x-tenant-id", tenant))


async def test_issued_token_is_accepted_downstream(sqlite_identity, downstream):
    """A token from IssueToken passes another service's interceptor with its tenant bound."""
    a = await sqlite_identity.tenant()
    resp = await downstream.Echo(echo_pb2.EchoRequest(message="hi"), metadata=a.metadata)
    assert resp.seen.tenant_id == a.tenant_id


async def test_exchange_narrows_and_names_the_delegator(sqlite_identity, downstream):
    """ExchangeToken: narrower scopes, act claim = caller, agent tag; widening is refused."""
    a = await sqlite_identity.tenant()
    caller = jwt.decode(a.token, options={"verify_signature": False})
    resp = await sqlite_identity.stub.ExchangeToken(
        pb.ExchangeTokenRequest(scopes=["testing.echo"], agent_id="triage", run_id="r_1", ttl_seconds=120),
        metadata=a.metadata,
    )
    claims = jwt.decode(resp.token, options={"verify_signature": False})
    assert claims["act"] == {"sub": caller["sub"]} and claims["agent"] == "triage" and claims["scope"] == "testing.echo"
    assert claims["exp"] <= caller["exp"]
    seen = await downstream.Echo(echo_pb2.EchoRequest(), metadata=_md(resp.token, a.tenant_id))
    assert seen.seen.principal_id == "agent:triage"
    narrow_md = _md(resp.token, a.tenant_id)
    err = await _error(
        sqlite_identity.stub.ExchangeToken(pb.ExchangeTokenRequest(scopes=["state.*"]), metadata=narrow_md)
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_exchanged_token_never_outlives_its_parent(sqlite_identity):
    """Asking for more time than the caller's token has left yields the caller's expiry."""
    a = await sqlite_identity.tenant()
    short = await sqlite_identity.login(a.api_key, ttl=30)
    resp = await sqlite_identity.stub.ExchangeToken(
        pb.ExchangeTokenRequest(scopes=["testing.echo"], ttl_seconds=3000), metadata=short.metadata
    )
    parent = jwt.decode(short.token, options={"verify_signature": False})
    assert resp.expire_time.seconds <= parent["exp"]


async def test_revocation_reaches_other_services_within_seconds(sqlite_identity, downstream):
    """After RevokeToken, a downstream service that had cached the token refuses it within seconds."""
    a = await sqlite_identity.tenant()
    assert (await downstream.Echo(echo_pb2.EchoRequest(), metadata=a.metadata)).seen.tenant_id == a.tenant_id
    await sqlite_identity.stub.RevokeToken(pb.RevokeTokenRequest(jti=a.jti), metadata=a.metadata)
    deadline = time.monotonic() + 5
    while True:
        try:
            await downstream.Echo(echo_pb2.EchoRequest(), metadata=a.metadata)
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            assert error_details(err)["reason"] == "TOKEN_REVOKED"
            break
        assert time.monotonic() < deadline, "revoked token still accepted after 5 s"
        await asyncio.sleep(0.1)


async def _until(call, accept, what: str, within: float = 2.0):
    """Repeat `call` until `accept(result or error)` holds; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            outcome = await call()
        except grpc.aio.AioRpcError as err:
            outcome = err
        if accept(outcome):
            return outcome
        assert time.monotonic() < deadline, f"{what} after {within} s (last: {outcome!r})"
        await asyncio.sleep(0.05)


def _refused(reason: str):
    return lambda o: isinstance(o, grpc.aio.AioRpcError) and error_details(o)["reason"] == reason


async def _set_status(identity, tenant_id: str, status) -> None:
    await identity.stub.UpdateTenantStatus(
        pb.UpdateTenantStatusRequest(tenant_id=tenant_id, status=status), metadata=identity.operator.metadata
    )


async def test_suspension_refuses_tokens_already_issued_within_two_seconds(sqlite_identity, downstream):
    """A token issued before its tenant was suspended is refused downstream (PERMISSION_DENIED,
    TENANT_SUSPENDED) within 2 s, other tenants are untouched, and resuming lets the same token in again."""
    a, b = await sqlite_identity.tenant(), await sqlite_identity.tenant()
    echo = lambda t: lambda: downstream.Echo(echo_pb2.EchoRequest(), metadata=t.metadata)  # noqa: E731
    assert (await echo(a)()).seen.tenant_id == a.tenant_id  # cached as verified before the suspension

    await _set_status(sqlite_identity, a.tenant_id, pb.TENANT_STATUS_SUSPENDED)
    refused = await _until(echo(a), _refused("TENANT_SUSPENDED"), "suspended tenant's token still accepted")
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "resume" in refused.details()
    assert (await echo(b)()).seen.tenant_id == b.tenant_id
    # identity itself refuses the suspended tenant's token too (not only the services that poll it).
    own = await _error(sqlite_identity.stub.ListPrincipals(pb.ListPrincipalsRequest(), metadata=a.metadata))
    assert error_details(own)["reason"] == "TENANT_SUSPENDED"

    await _set_status(sqlite_identity, a.tenant_id, pb.TENANT_STATUS_ACTIVE)
    back = await _until(echo(a), lambda o: not isinstance(o, grpc.aio.AioRpcError), "resumed tenant still refused")
    assert back.seen.tenant_id == a.tenant_id


async def test_revocation_list_is_only_for_platform_services(sqlite_identity):
    """ListRevokedTokens names every tenant's revocations and suspensions: no token is UNAUTHENTICATED,
    a tenant admin's token is PERMISSION_DENIED, a platform service's key reads it."""
    a = await sqlite_identity.tenant()
    await sqlite_identity.stub.RevokeToken(pb.RevokeTokenRequest(jti=a.jti), metadata=a.metadata)
    b = await sqlite_identity.tenant()
    await _set_status(sqlite_identity, b.tenant_id, pb.TENANT_STATUS_SUSPENDED)
    request = pb.ListRevokedTokensRequest()

    anonymous = await _error(sqlite_identity.stub.ListRevokedTokens(request))
    assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED
    c = await sqlite_identity.tenant()
    tenant = await _error(sqlite_identity.stub.ListRevokedTokens(request, metadata=c.metadata))
    assert (tenant.code(), error_details(tenant)["reason"]) == (grpc.StatusCode.PERMISSION_DENIED, "MISSING_SCOPE")
    assert a.jti not in str(tenant.trailing_metadata()) + tenant.details()

    service = await sqlite_identity.login(sqlite_identity.service_key_file("credentials").read_text().strip())
    listed = await sqlite_identity.stub.ListRevokedTokens(request, metadata=service.metadata)
    assert a.jti in {r.jti for r in listed.revoked}
    assert list(listed.suspended_tenant_ids) == [b.tenant_id]


async def test_rotation_keeps_old_tokens_valid_and_signs_new_ones_with_new_key(sqlite_identity, downstream):
    """After RotateSigningKey the old token still verifies; new tokens carry the new kid and verify too."""
    a = await sqlite_identity.tenant()
    old_kid = jwt.get_unverified_header(a.token)["kid"]
    rotated = await sqlite_identity.stub.RotateSigningKey(
        pb.RotateSigningKeyRequest(), metadata=sqlite_identity.operator.metadata
    )
    assert rotated.key.kid != old_kid
    fresh = await sqlite_identity.login(a.api_key)
    assert jwt.get_unverified_header(fresh.token)["kid"] == rotated.key.kid
    assert (await downstream.Echo(echo_pb2.EchoRequest(), metadata=a.metadata)).seen.tenant_id == a.tenant_id
    await asyncio.sleep(1.05)  # the verifier refetches an unknown kid at most once a second
    assert (await downstream.Echo(echo_pb2.EchoRequest(), metadata=fresh.metadata)).seen.tenant_id == a.tenant_id
    keys = await sqlite_identity.stub.ListSigningKeys(pb.ListSigningKeysRequest())
    assert {k.kid for k in keys.keys} >= {old_kid, rotated.key.kid}
    assert [k.kid for k in keys.keys if k.active] == [rotated.key.kid]


async def test_signing_keys_are_stored_encrypted(sqlite_identity):
    """The private half of a signing key is not in identity's database in the clear."""
    from sqlalchemy import select

    from services.identity.store import SigningKeyRow

    key = await sqlite_identity.app.keys.active()
    async with sqlite_identity.app.db.system_session() as s:
        rows = (await s.execute(select(SigningKeyRow))).scalars().all()
    assert rows and all(key.private_bytes() not in r.encrypted_private_key for r in rows)


async def test_a_replica_signs_with_another_replicas_new_key_once_it_reads_the_active_key_again(tmp_path, monkeypatch):
    """Each replica reads the active signing key at most every ACTIVE_KEY_REREAD_SECONDS; its own rotation applies
    at once, another replica's when it next reads (the retired key is still published meanwhile)."""
    import os

    from services.identity import signing
    from services.identity.server import MIGRATIONS
    from shared.db import Database

    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'id.db'}", migrations=MIGRATIONS)
    kek = os.urandom(32)
    one, two = signing.SigningKeys(db, kek), signing.SigningKeys(db, kek)
    try:
        first = await one.active()
        assert (await two.active()).kid == first.kid
        rotated = await one.rotate()
        assert (await one.active()).kid == rotated.kid  # its own rotation: at once
        assert (await two.active()).kid == first.kid  # read within the window: the old (still published) key
        assert first.kid in {r.kid for r in await two.published()}
        monkeypatch.setattr(signing, "ACTIVE_KEY_REREAD_SECONDS", 0.0)
        assert (await two.active()).kid == rotated.kid
    finally:
        await db.close()

"""The vault backend against a real OpenBao: isolation enforced by OpenBao itself, token reuse,
silo namespaces, KV v2 versions, and OpenBao going away and coming back."""

from __future__ import annotations

import base64

import grpc
import hvac
import hvac.exceptions
import pytest

from bulkhead.credentials.v1 import credentials_pb2 as pb
from services.credentials.backend import TenantRef
from tests.services.credentials.conftest import expect_error


async def _token(vh, tenant: str, tier: str = "pooled") -> str:
    import asyncio

    return await asyncio.to_thread(vh.service.backend.tokens.token_for, TenantRef(tenant, tier))


async def test_tenant_a_token_gets_403_from_openbao_on_tenant_b_paths(vh, openbao):
    """The token the service uses for A is refused BY OPENBAO on B's KV path and Transit key."""
    await vh.put("db", b"alpha-db-value")
    await vh.put("db", b"beta-db-value", tenant=vh.beta)
    await vh.stub.Encrypt(pb.EncryptRequest(plaintext=b"x"), metadata=vh.md(vh.beta))
    layout = vh.service.backend.layout
    alpha = hvac.Client(url=openbao.url, token=await _token(vh, vh.alpha))
    own = alpha.secrets.kv.v2.read_secret_version(
        f"tenants/{vh.alpha}/db", mount_point=layout.kv_mount, raise_on_deleted_version=True
    )
    assert base64.b64decode(own["data"]["data"]["value"]) == b"alpha-db-value"
    with pytest.raises(hvac.exceptions.Forbidden):
        alpha.secrets.kv.v2.read_secret_version(
            f"tenants/{vh.beta}/db", mount_point=layout.kv_mount, raise_on_deleted_version=True
        )
    with pytest.raises(hvac.exceptions.Forbidden):
        alpha.secrets.kv.v2.create_or_update_secret(
            f"tenants/{vh.beta}/db", secret={"value": "x"}, mount_point=layout.kv_mount
        )
    with pytest.raises(hvac.exceptions.Forbidden):
        alpha.secrets.transit.encrypt_data(f"tenant-{vh.beta}", "eA==", mount_point=layout.transit_mount)
    with pytest.raises(hvac.exceptions.Forbidden):
        alpha.sys.create_or_update_policy("escalate", 'path "*" { capabilities = ["sudo"] }')


async def test_tenant_tokens_are_short_lived_and_reused(vh, openbao):
    """One token per tenant serves many calls; it carries only the tenant's policy and a short TTL."""
    await vh.put("k", b"reuse-value")
    minted = vh.service.backend.tokens.minted_count
    for _ in range(10):
        await vh.get("k")
    assert vh.service.backend.tokens.minted_count == minted
    info = openbao.client().auth.token.lookup(await _token(vh, vh.alpha))["data"]
    assert info["policies"] == [f"bulkhead-tenant-{vh.alpha}"]
    assert 0 < info["ttl"] <= 300 and not info["renewable"]


async def test_kv_versions_are_openbaos_own(vh, openbao):
    """Our version numbers are KV v2's, and check-and-set is OpenBao's check-and-set."""
    for i in range(3):
        await vh.put("versions", f"v{i}-value".encode())
    meta = openbao.client().secrets.kv.v2.read_secret_metadata(
        f"tenants/{vh.alpha}/versions", mount_point=vh.service.backend.layout.kv_mount
    )["data"]
    assert meta["current_version"] == 3 and sorted(int(v) for v in meta["versions"]) == [1, 2, 3]
    # A write behind our back bumps OpenBao's version; our stale cas is then refused by OpenBao.
    openbao.client().secrets.kv.v2.create_or_update_secret(
        f"tenants/{vh.alpha}/versions", secret={"value": "eA=="}, mount_point=vh.service.backend.layout.kv_mount
    )
    details, _ = await expect_error(grpc.StatusCode.ABORTED, vh.put("versions", b"v4-value", cas=3))
    assert details["reason"] == "CAS_MISMATCH"


async def test_silo_tenant_lives_in_its_own_namespace(vh, openbao):
    """A silo tenant's secret is stored in its own OpenBao namespace, out of reach of pooled tokens."""
    silo = "t_silo" + vh.alpha[3:]
    md = vh.tokens.metadata(silo, ("*",), tier="silo")
    await vh.stub.PutSecret(pb.PutSecretRequest(name="k", value=b"silo-value"), metadata=md)
    assert (await vh.stub.GetSecret(pb.GetSecretRequest(name="k"), metadata=md)).value == b"silo-value"
    ns = f"bulkhead-{silo}"
    in_ns = openbao.client(namespace=ns).secrets.kv.v2.read_secret_version(
        f"tenants/{silo}/k", mount_point="bulkhead-kv", raise_on_deleted_version=True
    )
    assert base64.b64decode(in_ns["data"]["data"]["value"]) == b"silo-value"
    with pytest.raises(hvac.exceptions.InvalidPath):  # nothing of it in the root namespace
        openbao.client().secrets.kv.v2.read_secret_version(
            f"tenants/{silo}/k", mount_point="bulkhead-kv", raise_on_deleted_version=True
        )
    pooled = hvac.Client(url=openbao.url, token=await _token(vh, vh.alpha), namespace=ns)
    with pytest.raises(hvac.exceptions.Forbidden):
        pooled.secrets.kv.v2.read_secret_version(
            f"tenants/{silo}/k", mount_point="bulkhead-kv", raise_on_deleted_version=True
        )


async def test_openbao_down_is_unavailable_and_writes_nothing(vh, openbao):
    """With OpenBao stopped: UNAVAILABLE with a clear message, no metadata row; after restart it works."""
    await vh.put("before", b"before-value")
    openbao.stop()
    try:
        details, message = await expect_error(grpc.StatusCode.UNAVAILABLE, vh.put("during", b"during-value"))
        assert details["reason"] == "SECRET_MANAGER_UNAVAILABLE" and "OpenBao" in message
        assert details["retry_after"] == 1.0
        details, _ = await expect_error(grpc.StatusCode.UNAVAILABLE, vh.get("before"))
        await expect_error(
            grpc.StatusCode.UNAVAILABLE, vh.stub.Encrypt(pb.EncryptRequest(plaintext=b"x"), metadata=vh.md())
        )
        await expect_error(
            grpc.StatusCode.NOT_FOUND, vh.stub.DescribeSecret(pb.DescribeSecretRequest(name="during"), metadata=vh.md())
        )
        assert await vh.raw("SELECT * FROM cred_secrets WHERE name = 'during'") == []
        assert await vh.raw("SELECT * FROM cred_secret_versions WHERE name = 'during'") == []
        failed = [e for e in await vh.events() if e.outcome == pb.ACCESS_OUTCOME_FAILED]
        assert [e.reason for e in failed][:2] == ["SECRET_MANAGER_UNAVAILABLE"] * 2
        # Each attempt of the read was authorized (recorded as it started), then its fetch failed
        # (recorded after). GetSecret is idempotent, so the channel resent it after the server's 1 s
        # retry pushback, at most 5 attempts in all; every one is in the audit.
        reads = [
            (e.outcome, e.reason) for e in await vh.events(secret_name="before") if e.action == pb.ACCESS_ACTION_GET
        ]
        attempts = len(reads) // 2
        assert 1 <= attempts <= 5
        assert (
            reads
            == [(pb.ACCESS_OUTCOME_ALLOWED, ""), (pb.ACCESS_OUTCOME_FAILED, "SECRET_MANAGER_UNAVAILABLE")] * attempts
        )
    finally:
        openbao.start()
    # Same service process: it re-provisions mounts, key and policy that the restart wiped.
    assert (await vh.put("after", b"after-value")).current_version == 1
    assert (await vh.get("after")).value == b"after-value"
    # A secret written before the restart lost its values with OpenBao; writing it again works.
    await expect_error(grpc.StatusCode.NOT_FOUND, vh.get("before"))
    assert (await vh.put("before", b"rewritten-value")).current_version == 1
    assert (await vh.get("before")).value == b"rewritten-value"
    enc = await vh.stub.Encrypt(pb.EncryptRequest(plaintext=b"after restart"), metadata=vh.md())
    assert (
        await vh.stub.Decrypt(pb.DecryptRequest(ciphertext=enc.ciphertext), metadata=vh.md())
    ).plaintext == b"after restart"


async def test_a_tenant_token_is_replaced_before_it_expires(vh):
    """Past three quarters of its TTL the token is re-minted; the old one is no longer used."""
    tokens = vh.service.backend.tokens
    now = [1000.0]
    tokens._clock = lambda: now[0]
    tokens.forget(TenantRef(vh.alpha))
    await vh.put("k", b"first-value")
    first, minted = await _token(vh, vh.alpha), tokens.minted_count
    now[0] += 300 * 0.7  # the harness mints 300 s tokens
    await vh.get("k")
    assert (await _token(vh, vh.alpha), tokens.minted_count) == (first, minted)
    now[0] += 300 * 0.1
    assert (await vh.get("k")).value == b"first-value"
    assert tokens.minted_count == minted + 1 and await _token(vh, vh.alpha) != first


async def test_a_revoked_tenant_token_is_replaced_on_the_next_read(vh, openbao):
    """OpenBao refusing the cached token (revoked, or OpenBao restarted) sends the read down the hvac
    path, which mints a new token once; the caller just gets the value."""
    await vh.put("k", b"revoked-value")
    old = await _token(vh, vh.alpha)
    openbao.client().auth.token.revoke(old)
    minted = vh.service.backend.tokens.minted_count
    assert (await vh.get("k")).value == b"revoked-value"
    assert vh.service.backend.tokens.minted_count == minted + 1 and await _token(vh, vh.alpha) != old

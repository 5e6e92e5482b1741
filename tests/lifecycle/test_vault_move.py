"""Migrations move a tenant's secrets and Transit key in OpenBao (real servers: `openbao` is us's, `second_openbao`
eu's): pooled -> silo (the root namespace to the tenant's own) -> pooled, then us -> eu (one OpenBao to the
other), through the TenantLifecycleService calls identity makes (Copy, Verify, Switch, Release).

After each hop: the token issued before the first move (its tier claim: pooled) reads every secret version
under its number (a deleted or destroyed one stays so), decrypts a ciphertext and unwraps a data key (as state's wrapped keys)
made before the move, and encrypts anew; the key and values exist at the target only (the source's key,
values and policy, or its namespace, are destroyed on release); verify counts the KV versions and key
versions equal on both sides; a bystander tenant of the same OpenBao is untouched.
"""
from __future__ import annotations

import grpc
import pytest

from bulkhead.common.v1 import lifecycle_pb2 as lpb
from bulkhead.common.v1 import lifecycle_pb2_grpc
from bulkhead.credentials.v1 import credentials_pb2 as pb
from bulkhead.credentials.v1 import credentials_pb2_grpc
from services.credentials.backend import TenantRef
from services.credentials.regional import RegionalVault
from services.credentials.server import MIGRATIONS, serve_credentials
from services.credentials.vault_backend import VaultBackend
from services.credentials.vault_move import KEY_TABLE, KV_TABLE
from shared.client import make_channel
from shared.config import RegionDatabase
from shared.db import Database
from tests.lifecycle.test_residency import openbao_holds, second_openbao  # noqa: F401 - the fixture
from tests.services.credentials.conftest import AUDIT_KEY, TOKENS, new_tenant
from tests.services.orchestrator.mesh import TIERS

pytestmark = [pytest.mark.openbao]


def platform_md():
    return TOKENS.metadata("t_platform", scopes=("platform.lifecycle",))


async def hop(life, tenant: str, source: tuple[str, str], target: tuple[str, str]) -> lpb.VerifyTenantResponse:
    """(tier, region) -> (tier, region), as identity's coordinator makes it (regions named when they change)."""
    moves = source[1] != target[1]
    src = {"tier": TIERS[source[0]], "region": source[1] if moves else ""}
    dst = {"target_tier": TIERS[target[0]], "target_region": target[1] if moves else ""}
    copied = await life.CopyTenant(lpb.CopyTenantRequest(tenant_id=tenant, **src, **dst, pause_seconds=20),
                                   metadata=platform_md())
    again = await life.CopyTenant(lpb.CopyTenantRequest(tenant_id=tenant, **src, **dst, pause_seconds=20),
                                  metadata=platform_md())  # a coordinator that died after the copy: same end
    assert [(t.table, t.rows, t.checksum) for t in again.copied] == [(t.table, t.rows, t.checksum) for t in copied.copied]
    verified = await life.VerifyTenant(lpb.VerifyTenantRequest(tenant_id=tenant, **src, **dst), metadata=platform_md())
    assert verified.equal, verified
    await life.SwitchTenant(lpb.SwitchTenantRequest(tenant_id=tenant, tier=TIERS[target[0]],
                                                    region=target[1] if moves else ""), metadata=platform_md())
    released = await life.ReleaseTenant(lpb.ReleaseTenantRequest(
        tenant_id=tenant, tier=src["tier"], region=src["region"], current_tier=dst["target_tier"],
        current_region=dst["target_region"]), metadata=platform_md())
    assert {t.table for t in released.deleted} >= {KV_TABLE, KEY_TABLE}, released
    return verified


async def test_secrets_and_key_move_into_silo_back_and_to_another_region(tmp_path, openbao, second_openbao):  # noqa: F811
    mover, bystander = new_tenant("mv"), new_tenant("by")
    placed = {mover: "us", bystander: "us"}

    async def region_of(tenant_id: str) -> str:  # identity's placement at the start (the switch overrides it)
        return placed[tenant_id]

    us, eu = tmp_path / "us" / "credentials.db", tmp_path / "eu" / "credentials.db"
    db = await Database.open(f"sqlite+aiosqlite:///{us}", migrations=MIGRATIONS, region_of=region_of,
                             regions={"us": None, "eu": RegionDatabase(f"sqlite+aiosqlite:///{eu}",
                                                                       f"sqlite+aiosqlite:///{eu}")})
    vaults = {"us": openbao, "eu": second_openbao}
    backend = RegionalVault({r: VaultBackend(v.url, v.root_token, placed_tier=db.router.placed_tier)
                             for r, v in vaults.items()}, db.router.region_of)
    service = await serve_credentials(db=db, backend=backend, verifier=TOKENS.verifier, audit_key=AUDIT_KEY)
    channel = make_channel(service.running.address)
    stub = credentials_pb2_grpc.CredentialsServiceStub(channel)
    life = lifecycle_pb2_grpc.TenantLifecycleServiceStub(channel)
    md = TOKENS.metadata(mover, ("*",), tier="pooled")  # issued before every move
    try:
        for value in (b"v1", b"v2", b"v3"):
            await stub.PutSecret(pb.PutSecretRequest(name="db-password", value=value), metadata=md)
        await stub.PutSecret(pb.PutSecretRequest(name="api-key", value=b"k1"), metadata=md)
        for value in (b"k2", b"k3"):
            await stub.PutSecret(pb.PutSecretRequest(name="api-key", value=value), metadata=md)
        # In OpenBao: api-key v2 soft-deleted, v1 destroyed (as an expiry does): a move keeps both so.
        await backend.backends["us"].delete(TenantRef(mover), "api-key", [2])
        await backend.backends["us"].destroy(TenantRef(mover), "api-key", [1])
        ciphertext = (await stub.Encrypt(pb.EncryptRequest(plaintext=b"made before"), metadata=md)).ciphertext
        datakey = await stub.GenerateDataKey(pb.GenerateDataKeyRequest(), metadata=md)
        bmd = TOKENS.metadata(bystander, ("*",))
        await stub.PutSecret(pb.PutSecretRequest(name="theirs", value=b"b1"), metadata=bmd)
        theirs = (await stub.Encrypt(pb.EncryptRequest(plaintext=b"theirs"), metadata=bmd)).ciphertext

        async def still_works(where: tuple[str, str]) -> None:
            assert (await stub.GetSecret(pb.GetSecretRequest(name="db-password"), metadata=md)).value == b"v3"
            for version, value in ((1, b"v1"), (2, b"v2")):  # every version, under its number
                got = await stub.GetSecret(pb.GetSecretRequest(name="db-password", version=version), metadata=md)
                assert (got.version, got.value) == (version, value)
            assert (await stub.GetSecret(pb.GetSecretRequest(name="api-key"), metadata=md)).value == b"k3"
            for version in (1, 2):  # destroyed, deleted: still unreadable, under the same numbers
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.GetSecret(pb.GetSecretRequest(name="api-key", version=version), metadata=md)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND, version
            assert (await stub.Decrypt(pb.DecryptRequest(ciphertext=ciphertext), metadata=md)).plaintext == b"made before"
            unwrapped = await stub.Decrypt(pb.DecryptRequest(ciphertext=datakey.wrapped_key), metadata=md)
            assert unwrapped.plaintext == datakey.plaintext_key
            fresh = (await stub.Encrypt(pb.EncryptRequest(plaintext=b"after"), metadata=md)).ciphertext
            assert (await stub.Decrypt(pb.DecryptRequest(ciphertext=fresh), metadata=md)).plaintext == b"after"
            tier, region = where
            for r, server in vaults.items():  # the key and the values: at the target only
                for t in ("pooled", "silo"):
                    here = (r, t) == (region, "pooled" if tier != "silo" else "silo")
                    assert openbao_holds(server, mover, t) == (here, here), (where, r, t)
            # The bystander, in us's root namespace all along: untouched.
            assert (await stub.GetSecret(pb.GetSecretRequest(name="theirs"), metadata=bmd)).value == b"b1"
            assert (await stub.Decrypt(pb.DecryptRequest(ciphertext=theirs), metadata=bmd)).plaintext == b"theirs"
            assert openbao_holds(openbao, bystander, "pooled") == (True, True)

        await still_works(("pooled", "us"))
        for source, target in ((("pooled", "us"), ("silo", "us")), (("silo", "us"), ("pooled", "us")),
                               (("pooled", "us"), ("pooled", "eu"))):
            verified = await hop(life, mover, source, target)
            kv = [t for t in verified.target if t.table == KV_TABLE]
            assert kv and kv[0].rows == 6, verified  # db-password v1-v3, api-key v1-v3 (one destroyed, one deleted)
            await still_works(target)
    finally:
        await channel.close()
        await service.stop(grace=0.5)

"""PurgeTenant of the credentials service on real Postgres (app role under RLS) and OpenBao, per tier.

Three tenants (pooled, bridge, silo) store canary secrets and ciphertext; two bystanders of each tier
too. After purging the three: a superuser scan of every table of every database in the cluster
finds neither their ids nor their canaries; the bridge schema and silo database are gone; OpenBao
holds none of their KV paths, Transit keys or policies (nor the silo namespace), and a ciphertext
taken before no longer decrypts even with the root token; the bystanders' inventories are unchanged.
"""

from __future__ import annotations

import base64

import hvac
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from bulkhead.common.v1 import lifecycle_pb2 as lpb
from bulkhead.common.v1 import lifecycle_pb2_grpc
from bulkhead.credentials.v1 import credentials_pb2 as pb
from bulkhead.credentials.v1 import credentials_pb2_grpc
from services.credentials.backend import TenantRef
from services.credentials.server import MIGRATIONS, serve_credentials
from services.credentials.vault_backend import VaultBackend
from services.credentials.vault_layout import VaultLayout
from shared.client import make_channel
from shared.db import Database, bridge_schema, silo_database
from testkit.tokens import TestTokens
from tests.services.orchestrator.mesh import TIERS

pytestmark = [pytest.mark.postgres, pytest.mark.openbao]
TOKENS = TestTokens()


def platform_md():
    """identity's platform call metadata, minted per call (a module-level token expires mid-suite)."""
    return TOKENS.metadata("t_platform", scopes=("platform.lifecycle",))


async def superuser_hits(admin_url: str, needles: list[str]) -> list[str]:
    """db.schema.table of every row, in every database and schema, whose text holds a needle."""
    hits = []
    admin = create_async_engine(admin_url, poolclass=NullPool)
    try:
        async with admin.connect() as conn:
            names = (
                (await conn.execute(text("SELECT datname FROM pg_database WHERE NOT datistemplate"))).scalars().all()
            )
    finally:
        await admin.dispose()
    for name in names:
        engine = create_async_engine(admin.url.set(database=name), poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                tables = (
                    await conn.execute(
                        text(
                            "SELECT table_schema, table_name FROM information_schema.tables "
                            "WHERE table_type = 'BASE TABLE' "
                            "AND table_schema NOT IN ('pg_catalog', 'information_schema')"
                        )
                    )
                ).all()
                for schema, table in tables:
                    rows = await conn.execute(text(f'SELECT t::text FROM "{schema}"."{table}" t'))
                    for (row,) in rows:
                        hits.extend(f"{name}.{schema}.{table}: {n}" for n in needles if n in row)
        finally:
            await engine.dispose()
    return hits


async def inventory(stub, tenant_id: str, tier: str) -> dict:
    resp = await stub.InventoryTenant(
        lpb.InventoryTenantRequest(tenant_id=tenant_id, tier=TIERS[tier]), metadata=platform_md()
    )
    return {(t.store, t.table): (t.rows, t.checksum) for t in resp.tables}


async def test_purge_on_postgres_and_openbao_leaves_nothing_of_the_tenant(postgres, openbao):
    """Keys first, then rows, schema and database; bystanders untouched."""
    urls = await postgres.create_database("lifecycle_creds")
    db = await Database.open(urls.app_url, migrations=str(MIGRATIONS), owner_url=urls.owner_url)
    backend = VaultBackend(openbao.url, openbao.root_token, token_ttl_seconds=300)
    service = await serve_credentials(db=db, backend=backend, verifier=TOKENS.verifier)
    channel = make_channel(service.running.address)
    creds = credentials_pb2_grpc.CredentialsServiceStub(channel)
    life = lifecycle_pb2_grpc.TenantLifecycleServiceStub(channel)
    root = hvac.Client(url=openbao.url, token=openbao.root_token)
    layout = VaultLayout()
    try:
        import secrets as rnd

        victims = {tier: f"t_v{tier}{rnd.token_hex(4)}" for tier in TIERS}
        others = {tier: f"t_o{tier}{rnd.token_hex(4)}" for tier in TIERS}
        canary = {t: f"canary-{rnd.token_hex(8)}" for t in [*victims.values(), *others.values()]}
        cipher = {}
        for tier in TIERS:
            for tid in (victims[tier], others[tier]):
                md = TOKENS.metadata(tid, tier=tier)
                await creds.PutSecret(pb.PutSecretRequest(name="db-password", value=canary[tid].encode()), metadata=md)
                await creds.GetSecret(pb.GetSecretRequest(name="db-password"), metadata=md)
                cipher[tid] = (
                    await creds.Encrypt(pb.EncryptRequest(plaintext=canary[tid].encode()), metadata=md)
                ).ciphertext
        before = {tier: await inventory(life, others[tier], tier) for tier in TIERS}
        mine = await inventory(life, victims["bridge"], "bridge")
        assert mine[(f"schema:{bridge_schema(victims['bridge'])}", "cred_secrets")][0] == 1
        assert await superuser_hits(postgres.admin_url, list(victims.values()))  # the scan can find them

        for tier, tid in victims.items():
            out = await life.PurgeTenant(
                lpb.PurgeTenantRequest(tenant_id=tid, tier=TIERS[tier]), metadata=platform_md()
            )
            assert [k.key_id for k in out.destroyed_keys] == [f"transit:{layout.key_name(TenantRef(tid, tier))}"]
            assert {a.name: a.count for a in out.actions} == {"secrets_destroyed": 1}
            assert not out.kept
            if tier == "pooled":
                assert not out.dropped_stores and sum(d.rows for d in out.deleted) >= 4
            else:
                assert out.dropped_stores == [
                    f"schema:{bridge_schema(tid)}"
                    if tier == "bridge"
                    else f"database:{silo_database(db.engine.url.database, tid)}"
                ]
            again = await life.PurgeTenant(
                lpb.PurgeTenantRequest(tenant_id=tid, tier=TIERS[tier]), metadata=platform_md()
            )
            assert sum(d.rows for d in again.deleted) == 0 and not again.dropped_stores  # idempotent

        assert (
            await superuser_hits(postgres.admin_url, [*victims.values(), *(canary[t] for t in victims.values())]) == []
        )
        for tier in TIERS:
            assert await inventory(life, others[tier], tier) == before[tier]
        namespaces = root.sys.list_namespaces()["data"]["keys"]
        for tier, tid in victims.items():
            ref = TenantRef(tid, tier)
            ns = layout.namespace(ref)
            assert f"{ns}/" not in namespaces if ns else True
            client = hvac.Client(url=openbao.url, token=openbao.root_token, namespace=ns)
            if ns is None:
                assert (
                    f"tenant-{tid}"
                    not in client.secrets.transit.list_keys(mount_point=layout.transit_mount)["data"]["keys"]
                )
                with pytest.raises(hvac.exceptions.InvalidPath):
                    client.secrets.kv.v2.list_secrets(layout.prefix(ref), mount_point=layout.kv_mount)
                assert layout.policy_name(ref) not in root.sys.list_policies()["data"]["policies"]
            with pytest.raises((hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath)):
                client.secrets.transit.decrypt_data(
                    layout.key_name(ref), cipher[tid].decode(), mount_point=layout.transit_mount
                )
        for tier, tid in others.items():  # bystanders still decrypt theirs
            ref = TenantRef(tid, tier)
            client = hvac.Client(url=openbao.url, token=openbao.root_token, namespace=layout.namespace(ref))
            out = client.secrets.transit.decrypt_data(
                layout.key_name(ref), cipher[tid].decode(), mount_point=layout.transit_mount
            )
            assert base64.b64decode(out["data"]["plaintext"]).decode() == canary[tid]
    finally:
        await channel.close()
        await service.stop(grace=0.5)

"""Deleting pooled, bridge and silo tenants from the whole mesh on Postgres + OpenBao (production wiring).

A superuser scan of every table of every database finds no row naming a deleted tenant outside the
kept tables and none of its canaries; OpenBao holds none of its paths; a state event's data key,
copied before, no longer unwraps (its Transit key is gone); the receipts verify; bystanders'
inventories are unchanged in every service.
"""

from __future__ import annotations

import secrets

import grpc
import hvac
import pytest

from bulkhead.identity.v1 import identity_pb2 as idn
from bulkhead_cli.receipts import ReceiptError, receipt_document, verify_document
from services.credentials.backend import TenantRef
from services.credentials.vault_layout import VaultLayout
from services.identity.peers import PlatformCaller
from testkit.fake_anthropic import FakeAnthropic
from tests.isolation import resources
from tests.isolation.resources import make_victim
from tests.lifecycle.pg_mesh import running_pg_mesh
from tests.lifecycle.test_delete_mesh import KEPT_TABLES, addresses, inventories, wait_done
from tests.lifecycle.test_postgres_openbao import superuser_hits

pytestmark = [pytest.mark.postgres, pytest.mark.openbao, pytest.mark.slow]


async def wrapped_data_key(postgres, tenant_id: str) -> bytes:
    """One of the tenant's state data keys as stored (wrapped by its Transit key), read as superuser."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    admin = create_async_engine(postgres.admin_url, poolclass=NullPool)
    try:
        async with admin.connect() as conn:
            names = (
                (await conn.execute(text("SELECT datname FROM pg_database WHERE datname LIKE 'lc_state%'")))
                .scalars()
                .all()
            )
    finally:
        await admin.dispose()
    for name in names:
        engine = create_async_engine(admin.url.set(database=name), poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                schemas = (
                    (
                        await conn.execute(
                            text(
                                "SELECT table_schema FROM information_schema.tables "
                                "WHERE table_name = 'state_data_keys'"
                            )
                        )
                    )
                    .scalars()
                    .all()
                )
                for schema in schemas:
                    row = (
                        await conn.execute(
                            text(f'SELECT wrapped FROM "{schema}".state_data_keys WHERE tenant_id = :t'),
                            {"t": tenant_id},
                        )
                    ).first()
                    if row:
                        return bytes(row[0])
        finally:
            await engine.dispose()
    raise AssertionError(f"no state data key for {tenant_id}")


async def test_delete_on_postgres_and_openbao(tmp_path, postgres, openbao, monkeypatch):
    """Three tiers deleted at once; nothing of them is left but the documented ledger."""
    async with FakeAnthropic() as upstream, running_pg_mesh(tmp_path, postgres, openbao, upstream.base_url) as mesh:
        await mesh.orchestrator.dispatcher.stop()
        mesh.identity.app.deletions.peers.update(addresses(mesh))
        named = {"identity": mesh.identity.address, **addresses(mesh)}
        channels = {s: grpc.aio.insecure_channel(a) for s, a in named.items()}
        by_addr = {named[s]: c for s, c in channels.items()}
        caller = PlatformCaller(mesh.identity.app.keys)
        op = mesh.identity.operator.metadata
        try:
            victims, others, canary = {}, {}, {}
            for tier in ("pooled", "bridge", "silo"):
                for group in (victims, others):
                    t = await mesh.tenant(tier)
                    group[tier] = t
                    canary[t.tenant_id] = b"canary-" + secrets.token_hex(8).encode()
                    monkeypatch.setattr(resources, "SECRET_VALUE", canary[t.tenant_id])
                    await make_victim(mesh, channels, t)
            keys = {tier: await wrapped_data_key(postgres, t.tenant_id) for tier, t in victims.items()}
            before = {tier: await inventories(mesh, by_addr, caller, t.tenant_id, tier) for tier, t in others.items()}
            ids = [t.tenant_id for t in victims.values()]
            assert await superuser_hits(postgres.admin_url, ids)

            for t in victims.values():
                await mesh.identity.stub.DeleteTenant(
                    idn.DeleteTenantRequest(tenant_id=t.tenant_id, now=True), metadata=op
                )
            done = {tier: await wait_done(mesh, t.tenant_id, timeout=180) for tier, t in victims.items()}

            hits = await superuser_hits(postgres.admin_url, ids + [canary[i].decode() for i in ids])
            assert [h for h in hits if h.split(":")[0].rsplit(".", 1)[-1] not in KEPT_TABLES] == []
            assert not [h for h in hits if "canary-" in h.split(": ", 1)[1]]
            for tier, t in others.items():
                assert await inventories(mesh, by_addr, caller, t.tenant_id, tier) == before[tier]
            layout = VaultLayout()
            for tier, t in victims.items():
                ref = TenantRef(t.tenant_id, tier)
                client = hvac.Client(url=openbao.url, token=openbao.root_token, namespace=layout.namespace(ref))
                with pytest.raises((hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath)):
                    client.secrets.transit.decrypt_data(
                        layout.key_name(ref), keys[tier].decode(), mount_point=layout.transit_mount
                    )
                r = done[tier].receipt
                doc = receipt_document(r.body, r.signature, r.kid, r.public_key)
                body = verify_document(doc, trusted={r.kid: r.public_key})
                dropped = {s["service"]: s["dropped_stores"] for s in body["services"]}
                if tier != "pooled":
                    assert dropped["state"] and dropped["credentials"] and dropped["orchestrator"]
                    assert not dropped["metering"]  # its own store keeps the ledger
                doc["receipt"]["tier"] = "pooled" if tier != "pooled" else "silo"
                with pytest.raises(ReceiptError):
                    verify_document(doc)
        finally:
            for ch in channels.values():
                await ch.close()

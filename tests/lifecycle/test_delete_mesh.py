"""Deleting a tenant on the real mesh (six services, SQLite files, local key backends), per tier.

After DeleteTenant --now: a scan of every table of every SQLite file finds no row naming the tenant
except the documented kept ones, and no canary anywhere; its own files are gone; its ciphertext
no longer decrypts; the receipt verifies and a tampered one does not; another tenant's inventory is
unchanged in every service.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from pathlib import Path

import grpc
import pytest

from bulkhead.common.v1 import lifecycle_pb2 as lpb
from bulkhead.common.v1 import lifecycle_pb2_grpc
from bulkhead.identity.v1 import identity_pb2 as idn
from bulkhead_cli.receipts import ReceiptError, receipt_document, verify_document
from services.credentials.backend import TenantRef
from services.identity.deletion import STEPS
from services.identity.peers import PlatformCaller
from shared.errors import InvalidArgument
from shared.tenancy import TenantContext, tenant_scope
from testkit.fake_anthropic import FakeAnthropic
from tests.isolation import resources
from tests.isolation.resources import make_victim
from tests.services.orchestrator.mesh import TIERS, running_mesh

KEPT_TABLES = {
    "metering_usage_events",
    "metering_usage_hours",
    "metering_tenants",
    "metering_operator_audit",
    "metering_usage_retention",
    "tenants",
    "tenant_deletions",
    "tenant_deletion_steps",
}
"""Tables that may still name a deleted tenant (docs/CONTRACT.md, "What deletion keeps")."""


def addresses(mesh) -> dict[str, str]:
    out = {s: mesh.addr(s) for s in ("credentials", "state", "inference", "metering")}
    out["orchestrator"] = mesh.orchestrator.address
    return out


def scan(data_dir: Path, needles: list[bytes]) -> list[str]:
    """file:table rows holding any needle, over every table of every SQLite file under data_dir."""
    hits = []
    for path in sorted(data_dir.rglob("*.db")):
        conn = sqlite3.connect(path)
        try:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            for table in tables:
                for row in conn.execute(f'SELECT * FROM "{table}"'):
                    blob = b"|".join(v if isinstance(v, bytes) else str(v).encode() for v in row)
                    for needle in needles:
                        if needle in blob:
                            hits.append(f"{path.relative_to(data_dir)}:{table}:{needle[:12]!r}")
        finally:
            conn.close()
    return hits


async def inventories(mesh, channels, caller: PlatformCaller, tenant_id: str, tier: str) -> dict:
    out = {}
    for service, address in addresses(mesh).items():
        stub = lifecycle_pb2_grpc.TenantLifecycleServiceStub(channels[address])
        resp = await stub.InventoryTenant(
            lpb.InventoryTenantRequest(tenant_id=tenant_id, tier=TIERS[tier]), metadata=await caller.metadata()
        )
        out[service] = {(t.store, t.table): (t.rows, t.checksum) for t in resp.tables}
    return out


async def wait_done(mesh, tenant_id: str, timeout: float = 60.0) -> idn.GetDeletionReceiptResponse:
    op = mesh.identity.operator.metadata
    for _ in range(int(timeout / 0.2)):
        resp = await mesh.identity.stub.GetDeletionReceipt(
            idn.GetDeletionReceiptRequest(tenant_id=tenant_id), metadata=op
        )
        if resp.deletion.state == idn.DELETION_STATE_DONE:
            return resp
        await asyncio.sleep(0.2)
    raise AssertionError(f"deletion not done: {resp.deletion}")


@pytest.mark.parametrize("tier", ["pooled", "bridge", "silo"])
async def test_delete_now_shreds_every_service_and_signs_a_receipt(tmp_path, monkeypatch, tier):
    """Every service purges the tenant; only documented kept rows name it; its ciphertext is dead."""
    async with FakeAnthropic() as upstream, running_mesh(tmp_path, upstream_url=upstream.base_url) as mesh:
        await mesh.orchestrator.dispatcher.stop()  # runs stay queued: the purge must cancel them
        mesh.identity.app.deletions.peers.update(addresses(mesh))
        channels = {a: grpc.aio.insecure_channel(a) for a in addresses(mesh).values()}
        named = {"identity": mesh.identity.address, **addresses(mesh)}
        attack = {s: channels.get(a) or grpc.aio.insecure_channel(a) for s, a in named.items()}
        caller = PlatformCaller(mesh.identity.app.keys)
        try:
            victim, other = await mesh.tenant(tier), await mesh.tenant(tier)
            canary, other_canary = (b"canary-" + secrets.token_hex(8).encode() for _ in range(2))
            monkeypatch.setattr(resources, "SECRET_VALUE", canary)
            ids = await make_victim(mesh, attack, victim)
            monkeypatch.setattr(resources, "SECRET_VALUE", other_canary)
            await make_victim(mesh, attack, other)
            ref = TenantRef(victim.tenant_id, tier)
            backend = mesh.services["credentials"].backend
            as_victim = TenantContext(victim.tenant_id, "test", tier=tier)
            with tenant_scope(as_victim):
                assert await backend.decrypt(ref, ids.ciphertext) == canary  # the check below can fail
            before = await inventories(mesh, channels, caller, other.tenant_id, tier)
            mine = await inventories(mesh, channels, caller, victim.tenant_id, tier)
            assert sum(r for svc in mine.values() for r, _ in svc.values()) > 10
            assert scan(tmp_path, [victim.tenant_id.encode()])

            resp = await mesh.identity.stub.DeleteTenant(
                idn.DeleteTenantRequest(tenant_id=victim.tenant_id, now=True), metadata=mesh.identity.operator.metadata
            )
            assert [s.service for s in resp.deletion.steps] == list(STEPS)
            done = await wait_done(mesh, victim.tenant_id)

            hits = [h for h in scan(tmp_path, [victim.tenant_id.encode()]) if h.split(":")[1] not in KEPT_TABLES]
            assert hits == []
            assert scan(tmp_path, [canary]) == []
            own_files = [p.parent.name for p in tmp_path.rglob("*.db") if victim.tenant_id.lower() in p.name]
            assert own_files == ([] if tier == "pooled" else ["metering.tenants"])  # only the kept ledger's
            after = await inventories(mesh, channels, caller, other.tenant_id, tier)
            assert after == before
            assert all(
                rows == 0
                for svc, tables in (await inventories(mesh, channels, caller, victim.tenant_id, tier)).items()
                if svc != "metering"
                for rows, _ in tables.values()
            )
            with tenant_scope(as_victim), pytest.raises(InvalidArgument, match="cannot be decrypted"):
                await backend.decrypt(ref, ids.ciphertext)  # a new key ring, not the destroyed one

            r = done.receipt
            doc = receipt_document(r.body, r.signature, r.kid, r.public_key)
            keys = (await mesh.identity.stub.ListSigningKeys(idn.ListSigningKeysRequest())).keys
            body = verify_document(doc, trusted={k.kid: k.public_key for k in keys})
            by_service = {s["service"]: s for s in body["services"]}
            assert by_service["credentials"]["destroyed_keys"]
            assert by_service["orchestrator"]["actions"] == [{"name": "runs_cancelled", "count": 1}]
            assert {k["table"] for k in by_service["metering"]["kept"]} == {
                "metering_usage_events",
                "metering_usage_hours",
                "metering_tenants",
                "metering_usage_retention",
            }
            assert canary.decode() not in r.body.decode()
            if tier != "pooled":
                assert any(by_service[s]["dropped_stores"] for s in ("state", "credentials", "orchestrator"))
            doc["receipt"]["services"][1]["rows_deleted"] += 1
            with pytest.raises(ReceiptError, match="signature"):
                verify_document(doc)

            tenant = (
                await mesh.identity.stub.GetTenant(
                    idn.GetTenantRequest(tenant_id=victim.tenant_id), metadata=mesh.identity.operator.metadata
                )
            ).tenant
            assert tenant.status == idn.TENANT_STATUS_DELETED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await mesh.identity.login(victim.api_key)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            for ch in {id(c): c for c in attack.values()}.values():
                await ch.close()

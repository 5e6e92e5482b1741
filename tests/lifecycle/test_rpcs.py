"""DeleteTenant, GetDeletionReceipt and TenantLifecycleService: who may call them, bad input, grace and restore,
and a deletion that survives identity stopping half-way."""

from __future__ import annotations

import asyncio
import io

import grpc
import pytest

from bulkhead.common.v1 import lifecycle_pb2 as lpb
from bulkhead.common.v1 import lifecycle_pb2_grpc, tenancy_pb2
from bulkhead.identity.v1 import identity_pb2 as idn
from bulkhead.state.v1 import state_pb2 as st
from bulkhead.state.v1 import state_pb2_grpc
from services.identity.peers import PlatformCaller
from shared.errors import error_details
from testkit.fake_anthropic import FakeAnthropic
from tests.services.orchestrator.mesh import running_mesh


async def expect(code: grpc.StatusCode, call, reason: str | None = None):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == code, err.value.details()
    if reason:
        assert error_details(err.value)["reason"] == reason
    return err.value


@pytest.fixture
async def mesh(tmp_path):
    async with running_mesh(tmp_path, with_inference=False) as mesh:
        yield mesh


async def test_only_identitys_platform_token_may_call_the_lifecycle(mesh):
    """A tenant admin and an operator are refused; identity's platform.lifecycle token is served."""
    a, b = await mesh.tenant(), await mesh.tenant()
    async with grpc.aio.insecure_channel(mesh.addr("state")) as ch:
        stub = lifecycle_pb2_grpc.TenantLifecycleServiceStub(ch)
        req = lpb.PurgeTenantRequest(tenant_id=b.tenant_id, tier=tenancy_pb2.TIER_POOLED)
        for who in (a.metadata, b.metadata, mesh.identity.operator.metadata):
            await expect(grpc.StatusCode.PERMISSION_DENIED, stub.PurgeTenant(req, metadata=who))
            await expect(
                grpc.StatusCode.PERMISSION_DENIED,
                stub.InventoryTenant(
                    lpb.InventoryTenantRequest(tenant_id=b.tenant_id, tier=tenancy_pb2.TIER_POOLED), metadata=who
                ),
            )
        platform = await PlatformCaller(mesh.identity.app.keys).metadata()
        got = await stub.InventoryTenant(
            lpb.InventoryTenantRequest(tenant_id=b.tenant_id, tier=tenancy_pb2.TIER_POOLED), metadata=platform
        )
        assert got.service == "state" and got.tables
    async with grpc.aio.insecure_channel(mesh.identity.address) as ch:  # identity serves the same contract
        got = await lifecycle_pb2_grpc.TenantLifecycleServiceStub(ch).InventoryTenant(
            lpb.InventoryTenantRequest(tenant_id=b.tenant_id, tier=tenancy_pb2.TIER_BRIDGE), metadata=platform
        )
        rows = {t.table: t.rows for t in got.tables}
        assert rows["principals"] == 1 and rows["api_keys"] == 1 and {t.store for t in got.tables} == {"main"}


async def test_lifecycle_bad_input_is_precise(mesh):
    """Unset or unknown tier, malformed tenant id, the platform tenant: each its own status and reason."""
    t = await mesh.tenant()
    platform = await PlatformCaller(mesh.identity.app.keys).metadata()
    async with grpc.aio.insecure_channel(mesh.addr("credentials")) as ch:
        stub = lifecycle_pb2_grpc.TenantLifecycleServiceStub(ch)
        for tier in (tenancy_pb2.TIER_UNSPECIFIED, 99):
            await expect(
                grpc.StatusCode.INVALID_ARGUMENT,
                stub.PurgeTenant(lpb.PurgeTenantRequest(tenant_id=t.tenant_id, tier=tier), metadata=platform),
                "INVALID_TIER",
            )
        for bad in ("", "t_x'; DROP TABLE cred_secrets; --", "acme"):
            await expect(
                grpc.StatusCode.INVALID_ARGUMENT,
                stub.InventoryTenant(
                    lpb.InventoryTenantRequest(tenant_id=bad, tier=tenancy_pb2.TIER_POOLED), metadata=platform
                ),
                "INVALID_TENANT_ID",
            )
        await expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            stub.PurgeTenant(
                lpb.PurgeTenantRequest(tenant_id="t_platform", tier=tenancy_pb2.TIER_POOLED), metadata=platform
            ),
            "PLATFORM_TENANT",
        )
        # A tenant this service never saw (or already purged): nothing to destroy, and no store created.
        empty = await stub.PurgeTenant(
            lpb.PurgeTenantRequest(tenant_id="t_neverseen", tier=tenancy_pb2.TIER_SILO), metadata=platform
        )
        assert not empty.dropped_stores and all(d.rows == 0 for d in empty.deleted)


async def test_delete_tenant_refuses_tenants_and_bad_input(mesh):
    """DeleteTenant/GetDeletionReceipt: PERMISSION_DENIED for a tenant admin, NOT_FOUND, INVALID_ARGUMENT."""
    a, b = await mesh.tenant(), await mesh.tenant()
    ident, op = mesh.identity.stub, mesh.identity.operator.metadata
    for who in (a.metadata, b.metadata):
        await expect(
            grpc.StatusCode.PERMISSION_DENIED,
            ident.DeleteTenant(idn.DeleteTenantRequest(tenant_id=b.tenant_id, now=True), metadata=who),
        )
        await expect(
            grpc.StatusCode.PERMISSION_DENIED,
            ident.GetDeletionReceipt(idn.GetDeletionReceiptRequest(tenant_id=b.tenant_id), metadata=who),
        )
    await expect(
        grpc.StatusCode.NOT_FOUND,
        ident.DeleteTenant(idn.DeleteTenantRequest(tenant_id="t_nosuchtenant", now=True), metadata=op),
        "TENANT_NOT_FOUND",
    )
    await expect(
        grpc.StatusCode.NOT_FOUND,
        ident.GetDeletionReceipt(idn.GetDeletionReceiptRequest(tenant_id=b.tenant_id), metadata=op),
        "DELETION_NOT_FOUND",
    )
    for bad in (
        idn.DeleteTenantRequest(tenant_id=b.tenant_id),
        idn.DeleteTenantRequest(tenant_id=b.tenant_id, grace_seconds=60, now=True),
        idn.DeleteTenantRequest(tenant_id=b.tenant_id, grace_seconds=-1),
        idn.DeleteTenantRequest(tenant_id=b.tenant_id, grace_seconds=10**9),
    ):
        await expect(grpc.StatusCode.INVALID_ARGUMENT, ident.DeleteTenant(bad, metadata=op), "BAD_GRACE")
    await expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        ident.DeleteTenant(idn.DeleteTenantRequest(tenant_id="t_platform", now=True), metadata=op),
        "PLATFORM_TENANT",
    )
    # None of that touched b.
    got = await ident.GetTenant(idn.GetTenantRequest(tenant_id=b.tenant_id), metadata=op)
    assert got.tenant.status == idn.TENANT_STATUS_ACTIVE


async def _thread_call(mesh, tenant):
    async with grpc.aio.insecure_channel(mesh.addr("state")) as ch:
        return await state_pb2_grpc.StateServiceStub(ch).ListThreads(st.ListThreadsRequest(), metadata=tenant.metadata)


async def test_grace_period_suspends_and_resume_restores(mesh):
    """With a grace period the tenant is DELETING (its tokens refused) until resumed, and nothing is purged."""
    t = await mesh.tenant()
    ident, op = mesh.identity.stub, mesh.identity.operator.metadata
    resp = await ident.DeleteTenant(idn.DeleteTenantRequest(tenant_id=t.tenant_id, grace_seconds=3600), metadata=op)
    assert resp.deletion.state == idn.DELETION_STATE_SCHEDULED
    again = await ident.DeleteTenant(idn.DeleteTenantRequest(tenant_id=t.tenant_id, grace_seconds=60), metadata=op)
    assert again.deletion.delete_after_time == resp.deletion.delete_after_time  # a repeat plans nothing new
    status = (await ident.GetTenant(idn.GetTenantRequest(tenant_id=t.tenant_id), metadata=op)).tenant.status
    assert status == idn.TENANT_STATUS_DELETING
    for _ in range(50):
        try:
            await _thread_call(mesh, t)
        except grpc.aio.AioRpcError as exc:
            assert error_details(exc)["reason"] == "TENANT_SUSPENDED"
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("a deleting tenant's token still worked after 5 s")
    await expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        ident.UpdateTenantStatus(
            idn.UpdateTenantStatusRequest(tenant_id=t.tenant_id, status=idn.TENANT_STATUS_SUSPENDED), metadata=op
        ),
        "TENANT_DELETING",
    )
    await ident.UpdateTenantStatus(
        idn.UpdateTenantStatusRequest(tenant_id=t.tenant_id, status=idn.TENANT_STATUS_ACTIVE), metadata=op
    )
    await expect(
        grpc.StatusCode.NOT_FOUND,
        ident.GetDeletionReceipt(idn.GetDeletionReceiptRequest(tenant_id=t.tenant_id), metadata=op),
    )
    fresh = await mesh.identity.login(t.api_key)
    for _ in range(50):
        try:
            await _thread_call(mesh, fresh)
            break
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.1)
    else:
        raise AssertionError("a restored tenant stayed refused")


async def test_now_brings_a_scheduled_deletion_forward(tmp_path):
    """A tenant scheduled with a week's grace is deleted at once when the operator repeats with now."""
    async with FakeAnthropic() as upstream, running_mesh(tmp_path, upstream_url=upstream.base_url) as mesh:
        peers = {s: mesh.addr(s) for s in ("credentials", "state", "inference", "metering")}
        mesh.identity.app.deletions.peers.update({**peers, "orchestrator": mesh.orchestrator.address})
        t = await mesh.tenant()
        ident, op = mesh.identity.stub, mesh.identity.operator.metadata
        await ident.DeleteTenant(idn.DeleteTenantRequest(tenant_id=t.tenant_id, grace_seconds=7 * 86400), metadata=op)
        await ident.DeleteTenant(idn.DeleteTenantRequest(tenant_id=t.tenant_id, now=True), metadata=op)
        for _ in range(100):
            got = await ident.GetDeletionReceipt(idn.GetDeletionReceiptRequest(tenant_id=t.tenant_id), metadata=op)
            if got.deletion.state == idn.DELETION_STATE_DONE:
                break
            await asyncio.sleep(0.1)
        assert got.deletion.state == idn.DELETION_STATE_DONE and got.receipt.signature


async def test_deletion_resumes_after_identity_stops_midway(tmp_path):
    """State unreachable: orchestrator and credentials are done, state fails; identity stops. A new identity
    on the same database, with state reachable, completes the plan from where it stopped."""
    from services.identity.config import IdentityConfig
    from services.identity.server import start as start_identity

    async with FakeAnthropic() as upstream, running_mesh(tmp_path, upstream_url=upstream.base_url) as mesh:
        t = await mesh.tenant("bridge")
        peers = {s: mesh.addr(s) for s in ("credentials", "state", "inference", "metering")}
        peers["orchestrator"] = mesh.orchestrator.address
        app = mesh.identity.app
        app.deletions.peers.update({**peers, "state": "127.0.0.1:1"})
        await mesh.identity.stub.DeleteTenant(
            idn.DeleteTenantRequest(tenant_id=t.tenant_id, now=True), metadata=mesh.identity.operator.metadata
        )
        for _ in range(100):
            steps = {s.service: s for s in (await app.deletions.get(t.tenant_id)).steps}
            if steps["state"].attempts:
                break
            await asyncio.sleep(0.1)
        assert [s for s, row in steps.items() if row.done] == ["orchestrator", "credentials"]
        assert "UNAVAILABLE" in steps["state"].last_error
        address = app.running.address
        await app.close(0)

        env = {
            "BULKHEAD_DATA_DIR": str(tmp_path / "identity"),
            "BULKHEAD_REVOCATION_POLL_SECONDS": "0.2",
            "BULKHEAD_IDENTITY_DELETION_INTERVAL_SECONDS": "0.3",
            **{f"BULKHEAD_{s.upper()}_ADDR": a for s, a in peers.items()},
        }
        again = await start_identity(IdentityConfig.from_env(env), address=address, announce=io.StringIO())
        try:
            for _ in range(150):
                view = await again.deletions.get(t.tenant_id)
                if view.row.state == "done":
                    break
                await asyncio.sleep(0.2)
            assert view.row.state == "done", [(s.service, s.done, s.last_error) for s in view.steps]
            assert all(s.done for s in view.steps)
            first = {s.service: s.attempts for s in view.steps}
            assert first["orchestrator"] == 0 and first["state"] >= 1  # earlier steps were not run again
            assert view.row.receipt_signature
        finally:
            await again.close(0)


async def test_deleted_tenants_leave_the_suspended_list_once_no_token_can_be_live(tmp_path):
    """Listed while deleting and for the longest token lifetime after; not forever."""
    from datetime import timedelta

    from services.identity.signing import MAX_TOKEN_TTL, suspended_tenants, utcnow
    from services.identity.store import DeletionRow, TenantRow

    async with running_mesh(tmp_path, with_inference=False) as mesh:
        db = mesh.identity.app.db
        fresh, old = await mesh.tenant(), await mesh.tenant()
        async with db.system_session() as s:
            for t, ago in ((fresh, 600), (old, MAX_TOKEN_TTL + 600)):
                (await s.get(TenantRow, t.tenant_id)).status = "deleted"
                s.add(
                    DeletionRow(
                        tenant_id=t.tenant_id,
                        tier="pooled",
                        state="done",
                        requested_at=utcnow(),
                        delete_after=utcnow(),
                        completed_at=utcnow() - timedelta(seconds=ago),
                    )
                )
        listed = await suspended_tenants(db)
        assert fresh.tenant_id in listed and old.tenant_id not in listed

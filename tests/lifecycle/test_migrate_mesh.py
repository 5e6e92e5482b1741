"""MigrateTenant / GetMigration through identity over the whole mesh (embedded SQLite): pooled -> silo -> pooled
with a live writer, resume after identity stops mid-way, abort, and who may call it / bad input.

Every service's moving tables verify equal at each hop, the tenant's inventories (outside the writer's
state tables) are the same after each hop as before, the writer (a token issued before the moves) sees only
retried TENANT_MIGRATING pauses and finds every acknowledged event once, and a bystander is untouched.
"""

from __future__ import annotations

import asyncio
import io
import time

import grpc
import pytest

from bulkhead.common.v1 import audit_pb2, audit_pb2_grpc
from bulkhead.identity.v1 import identity_pb2 as idn
from bulkhead.state.v1 import state_pb2 as st
from bulkhead.state.v1 import state_pb2_grpc
from services.identity.peers import PlatformCaller
from shared.errors import error_details
from testkit.fake_anthropic import FakeAnthropic
from tests.isolation.resources import make_victim
from tests.lifecycle.test_delete_mesh import addresses, inventories
from tests.lifecycle.test_migrate_postgres import Writer
from tests.services.orchestrator.mesh import TIERS, running_mesh

pytestmark = [pytest.mark.slow]
WRITER_TABLES = {"state_events", "state_threads", "state_audit", "state_data_keys"}


async def wait_migration(mesh, tenant_id: str, states=("done",), timeout: float = 60.0) -> idn.TenantMigration:
    deadline = time.monotonic() + timeout
    while True:
        got = (
            await mesh.identity.stub.GetMigration(
                idn.GetMigrationRequest(tenant_id=tenant_id), metadata=mesh.identity.operator.metadata
            )
        ).migration
        if idn.MigrationState.Name(got.state).removeprefix("MIGRATION_STATE_").lower() in states:
            return got
        assert time.monotonic() < deadline, got
        await asyncio.sleep(0.1)


def comparable(inv: dict) -> dict:
    """Per service and table (the store's name differs by tier), outside the writer's tables."""
    return {
        (svc, table): value
        for svc, tables in inv.items()
        for (_, table), value in tables.items()
        if table not in WRITER_TABLES
    }


async def read_all(stub, md, thread_id: str, timeout: float = 10.0) -> list[bytes]:
    """Every event of the thread. A migration that just ended may still be published paused to the replica
    (until its next feed poll): that refusal is retried after the delay it names, as any client would."""
    got, after = [], 0
    deadline = time.monotonic() + timeout
    while True:
        try:
            page = await stub.ReadEvents(
                st.ReadEventsRequest(thread_id=thread_id, after_version=after, page_size=1000), metadata=md
            )
        except grpc.aio.AioRpcError as exc:
            info = error_details(exc)
            if info.get("reason") != "TENANT_MIGRATING" or time.monotonic() > deadline:
                raise
            await asyncio.sleep(float(info.get("retry_after") or 0.2))
            continue
        if not page.events:
            return got
        got.extend(e.payload for e in page.events)
        after = page.events[-1].version


@pytest.fixture
async def mesh(tmp_path):
    async with FakeAnthropic() as upstream, running_mesh(tmp_path, upstream_url=upstream.base_url) as mesh:
        await mesh.orchestrator.dispatcher.stop()
        mesh.identity.app.deletions.peers.update(addresses(mesh))
        yield mesh


async def test_migrate_pooled_silo_pooled_with_a_live_writer(mesh):
    named = addresses(mesh)
    channels = {s: grpc.aio.insecure_channel(a) for s, a in {"identity": mesh.identity.address, **named}.items()}
    by_addr = {named[s]: channels[s] for s in named}
    caller = PlatformCaller(mesh.identity.app.keys)
    op = mesh.identity.operator.metadata
    try:
        t, other = await mesh.tenant("pooled"), await mesh.tenant("pooled")
        for who in (t, other):
            await make_victim(mesh, channels, who)
        state = state_pb2_grpc.StateServiceStub(channels["state"])
        await state.CreateThread(st.CreateThreadRequest(thread_id="live"), metadata=t.metadata)
        theirs = await inventories(mesh, by_addr, caller, other.tenant_id, "pooled")
        mine = comparable(await inventories(mesh, by_addr, caller, t.tenant_id, "pooled"))
        writer = Writer(state, t.metadata, "live")
        task = asyncio.create_task(writer.run())
        pauses = []
        try:
            for target in ("silo", "pooled"):
                await asyncio.sleep(0.3)
                got = await mesh.identity.stub.MigrateTenant(
                    idn.MigrateTenantRequest(tenant_id=t.tenant_id, target_tier=TIERS[target]), metadata=op
                )
                assert got.migration.target_tier == TIERS[target]
                done = await wait_migration(mesh, t.tenant_id)
                assert [s.phase for s in done.steps] == ["released"] * 5, done
                assert all(tbl.equal for s in done.steps for tbl in s.tables) and done.generation >= 1
                pauses.append(done.pause_ms)
                tenant = (
                    await mesh.identity.stub.GetTenant(idn.GetTenantRequest(tenant_id=t.tenant_id), metadata=op)
                ).tenant
                assert tenant.tier == TIERS[target]
                assert comparable(await inventories(mesh, by_addr, caller, t.tenant_id, target)) == mine
                again = await mesh.identity.stub.MigrateTenant(  # a repeat returns the finished plan
                    idn.MigrateTenantRequest(tenant_id=t.tenant_id, target_tier=TIERS[target]), metadata=op
                )
                assert again.migration.state == idn.MIGRATION_STATE_DONE
            await asyncio.sleep(0.3)
        finally:
            writer.stop()
            await task
        assert writer.errors == []
        assert await read_all(state, t.metadata, "live") == writer.acked and len(writer.acked) > 20
        assert await inventories(mesh, by_addr, caller, other.tenant_id, "pooled") == theirs
        # Each move is one tier change in the tenant's configuration audit (the repeats added none).
        audit = audit_pb2_grpc.ConfigAuditServiceStub(channels["identity"])
        events = (
            await audit.ListAuditEvents(
                audit_pb2.ListAuditEventsRequest(tenant_id=t.tenant_id, action="tenant.tier", oldest_first=True),
                metadata=op,
            )
        ).events
        assert [(e.action, e.target) for e in events] == [("tenant.tier", f"tenant/{t.tenant_id}")] * 2, events
        assert all(e.actor.operator_id or e.actor.principal_id for e in events)
        print(
            f"\nidentity-measured pauses (ms): {pauses}; writer's retried pauses (s): "
            f"{[round(p, 3) for p in writer.pauses]}"
        )
    finally:
        for ch in channels.values():
            await ch.close()


async def test_migration_resumes_after_identity_stops_midway(mesh, tmp_path):
    """state unreachable: the copy stops there (and retries); identity stops; a new identity on the same
    database, with state reachable, copies every service again and completes."""
    from services.identity.config import IdentityConfig
    from services.identity.server import start as start_identity

    t = await mesh.tenant("pooled")
    state = state_pb2_grpc.StateServiceStub(grpc.aio.insecure_channel(mesh.addr("state")))
    await state.CreateThread(st.CreateThreadRequest(thread_id="x"), metadata=t.metadata)
    await state.AppendEvents(
        st.AppendEventsRequest(thread_id="x", events=[st.NewEvent(type="m", payload=b"a")]), metadata=t.metadata
    )
    app = mesh.identity.app
    peers = addresses(mesh)
    app.deletions.peers.update({**peers, "state": "127.0.0.1:1"})
    await mesh.identity.stub.MigrateTenant(
        idn.MigrateTenantRequest(tenant_id=t.tenant_id, target_tier=TIERS["bridge"]),
        metadata=mesh.identity.operator.metadata,
    )
    for _ in range(100):
        view = await app.migrations.get(t.tenant_id)
        steps = {s.service: s for s in view.steps}
        if steps["state"].attempts:
            break
        await asyncio.sleep(0.1)
    assert view.row.state == "copying" and "UNAVAILABLE" in steps["state"].last_error
    assert [s for s, row in steps.items() if row.phase == "copied"] == ["orchestrator", "credentials"]
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
            view = await again.migrations.get(t.tenant_id)
            if view.row.state == "done":
                break
            await asyncio.sleep(0.2)
        assert view.row.state == "done", [(s.service, s.phase, s.last_error) for s in view.steps]
        assert all(s.phase == "released" for s in view.steps)
        # The old token (tier claim pooled) reads its event from the bridge store now, once state has
        # seen identity's feed lift the pause (a bounded wait a client's retry policy rides out).
        for _ in range(50):
            try:
                got = await state.ReadEvents(st.ReadEventsRequest(thread_id="x"), metadata=t.metadata)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                assert error_details(exc)["reason"] == "TENANT_MIGRATING", exc
                await asyncio.sleep(0.1)
        assert [e.payload for e in got.events] == [b"a"]
    finally:
        await again.close(0)


async def test_abort_rolls_back_to_the_source_tier(mesh):
    t = await mesh.tenant("pooled")
    state = state_pb2_grpc.StateServiceStub(grpc.aio.insecure_channel(mesh.addr("state")))
    await state.CreateThread(st.CreateThreadRequest(thread_id="x"), metadata=t.metadata)
    app = mesh.identity.app
    peers = addresses(mesh)
    app.deletions.peers.update({**peers, "metering": "127.0.0.1:1"})  # the last copy fails: the rest are paused
    op = mesh.identity.operator.metadata
    await mesh.identity.stub.MigrateTenant(
        idn.MigrateTenantRequest(tenant_id=t.tenant_id, target_tier=TIERS["silo"]), metadata=op
    )
    for _ in range(100):
        view = await app.migrations.get(t.tenant_id)
        if {s.service: s for s in view.steps}["metering"].attempts:
            break
        await asyncio.sleep(0.1)
    with pytest.raises(grpc.aio.AioRpcError) as err:  # paused by state's copy
        await state.AppendEvents(
            st.AppendEventsRequest(thread_id="x", events=[st.NewEvent(type="m", payload=b"a")]), metadata=t.metadata
        )
    assert error_details(err.value)["reason"] == "TENANT_MIGRATING"
    with pytest.raises(grpc.aio.AioRpcError) as err:  # another target while one is under way
        await mesh.identity.stub.MigrateTenant(
            idn.MigrateTenantRequest(tenant_id=t.tenant_id, target_tier=TIERS["bridge"]), metadata=op
        )
    assert error_details(err.value)["reason"] == "MIGRATION_IN_PROGRESS"
    app.deletions.peers.update(peers)
    await mesh.identity.stub.MigrateTenant(idn.MigrateTenantRequest(tenant_id=t.tenant_id, abort=True), metadata=op)
    for _ in range(50):
        if await app.migrations.run(t.tenant_id):
            break
        await asyncio.sleep(0.2)
    done = await wait_migration(mesh, t.tenant_id, states=("aborted",))
    assert all(s.phase == "released" for s in done.steps)
    tenant = (await mesh.identity.stub.GetTenant(idn.GetTenantRequest(tenant_id=t.tenant_id), metadata=op)).tenant
    assert tenant.tier == TIERS["pooled"]
    await state.AppendEvents(
        st.AppendEventsRequest(thread_id="x", events=[st.NewEvent(type="m", payload=b"a")]), metadata=t.metadata
    )


async def test_migrate_tenant_refuses_tenants_and_bad_input(mesh):
    t, other = await mesh.tenant(), await mesh.tenant()
    stub, op = mesh.identity.stub, mesh.identity.operator.metadata

    async def refused(req, code, reason=None, md=op):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.MigrateTenant(req, metadata=md)
        assert err.value.code() == code, err.value.details()
        if reason:
            assert error_details(err.value)["reason"] == reason

    for who in (t, other):  # a tenant admin, for itself or another: refused before any handler
        await refused(
            idn.MigrateTenantRequest(tenant_id=t.tenant_id, target_tier=TIERS["silo"]),
            grpc.StatusCode.PERMISSION_DENIED,
            md=who.metadata,
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetMigration(idn.GetMigrationRequest(tenant_id=t.tenant_id), metadata=who.metadata)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await refused(idn.MigrateTenantRequest(tenant_id=t.tenant_id), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TIER")
    await refused(
        idn.MigrateTenantRequest(tenant_id=t.tenant_id, target_tier=42),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_TIER",
    )
    await refused(idn.MigrateTenantRequest(target_tier=TIERS["silo"]), grpc.StatusCode.INVALID_ARGUMENT)
    await refused(
        idn.MigrateTenantRequest(tenant_id=t.tenant_id, target_tier=TIERS["pooled"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "SAME_TIER",
    )
    region = (await stub.GetTenant(idn.GetTenantRequest(tenant_id=t.tenant_id), metadata=op)).tenant.region
    await refused(
        idn.MigrateTenantRequest(tenant_id=t.tenant_id, target_region=region),  # where it is already
        grpc.StatusCode.INVALID_ARGUMENT,
        "SAME_TIER",
    )
    await refused(
        idn.MigrateTenantRequest(tenant_id=t.tenant_id, target_region="eu"),  # not this deployment's
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_REGION",
    )
    await refused(
        idn.MigrateTenantRequest(tenant_id="t_nosuchtenant", target_tier=TIERS["silo"]),
        grpc.StatusCode.NOT_FOUND,
        "TENANT_NOT_FOUND",
    )
    await refused(
        idn.MigrateTenantRequest(tenant_id=t.tenant_id, abort=True), grpc.StatusCode.FAILED_PRECONDITION, "NO_MIGRATION"
    )
    await refused(
        idn.MigrateTenantRequest(tenant_id="t_platform", target_tier=TIERS["silo"]),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PLATFORM_TENANT",
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetMigration(idn.GetMigrationRequest(tenant_id=t.tenant_id), metadata=op)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

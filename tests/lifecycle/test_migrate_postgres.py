"""Live tier migration of the state service on real Postgres: pooled -> bridge -> silo -> pooled under a
live writer, through the TenantLifecycleService calls a coordinator makes (Copy, Verify, Switch, Release).

The writer keeps appending with the token it had before the first move (its tier claim says pooled the
whole time: after each switch the placement routes it, not the claim). It sees no error but the bounded
TENANT_MIGRATING pause, which it retries; afterwards every acknowledged event is there exactly once, in
order, still decrypting; each hop's checksums are equal on both sides; the old store is gone; bystanders'
inventories are unchanged. An aborted move leaves the tenant where it was and its partial copy removable.
"""
from __future__ import annotations

import asyncio
import secrets
import time

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from bulkhead.common.v1 import lifecycle_pb2 as lpb
from bulkhead.common.v1 import lifecycle_pb2_grpc
from bulkhead.state.v1 import state_pb2 as st
from bulkhead.state.v1 import state_pb2_grpc
from services.state.datakeys import LocalDataKeyProvider
from services.state.server import MIGRATIONS, make_envelope, serve_state
from shared.db import Database, bridge_schema, silo_database
from shared.errors import error_details
from shared.testing.tokens import TestTokens
from tests.services.orchestrator.mesh import TIERS

pytestmark = [pytest.mark.postgres]
TOKENS = TestTokens()
SCOPE = st.ContextScope(kind=st.SCOPE_KIND_TEAM, id="support")


def platform_md():
    return TOKENS.metadata("t_platform", scopes=("platform.lifecycle",))


class Writer:
    """Appends one event at a time with a fixed token; retries TENANT_MIGRATING refusals, fails on anything else."""

    def __init__(self, stub, md, thread_id: str) -> None:
        self.stub, self.md, self.thread_id = stub, md, thread_id
        self.acked: list[bytes] = []
        self.pauses: list[float] = []
        self.errors: list[str] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        paused_since = None
        while not self._stop.is_set():
            payload = f"event-{len(self.acked)}".encode()
            try:
                await self.stub.AppendEvents(st.AppendEventsRequest(
                    thread_id=self.thread_id, events=[st.NewEvent(type="message", payload=payload)]), metadata=self.md)
            except grpc.aio.AioRpcError as exc:
                info = error_details(exc)
                if exc.code() == grpc.StatusCode.UNAVAILABLE and info.get("reason") == "TENANT_MIGRATING":
                    paused_since = paused_since or time.monotonic()
                    await asyncio.sleep(float(info.get("retry_after") or 0.2))
                    continue
                self.errors.append(f"{exc.code().name}: {exc.details()}")
                return
            self.acked.append(payload)
            if paused_since is not None:
                self.pauses.append(time.monotonic() - paused_since)
                paused_since = None
            await asyncio.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()


async def inventory(life, tenant_id: str, tier: str) -> dict:
    got = await life.InventoryTenant(lpb.InventoryTenantRequest(tenant_id=tenant_id, tier=TIERS[tier]),
                                     metadata=platform_md())
    return {(t.store, t.table): (t.rows, t.checksum) for t in got.tables if t.table != "security_events"}


async def move(life, tenant_id: str, source: str, target: str, *, twice: bool = False) -> lpb.VerifyTenantResponse:
    """One hop as the coordinator makes it: copy (paused), verify, switch, release the source."""
    req = lpb.CopyTenantRequest(tenant_id=tenant_id, tier=TIERS[source], target_tier=TIERS[target], pause_seconds=20)
    copied = await life.CopyTenant(req, metadata=platform_md())
    if twice:  # a coordinator that died after the copy calls it again: same end state
        again = await life.CopyTenant(req, metadata=platform_md())
        assert [(t.table, t.rows, t.checksum) for t in again.copied] == \
               [(t.table, t.rows, t.checksum) for t in copied.copied]
    verified = await life.VerifyTenant(lpb.VerifyTenantRequest(tenant_id=tenant_id, tier=TIERS[source],
                                                               target_tier=TIERS[target]), metadata=platform_md())
    assert verified.equal and not verified.mismatched_tables, verified
    assert [(t.table, t.rows, t.checksum) for t in verified.target] == \
           [(t.table, t.rows, t.checksum) for t in copied.copied]
    assert sum(t.rows for t in verified.source) > 0
    await life.SwitchTenant(lpb.SwitchTenantRequest(tenant_id=tenant_id, tier=TIERS[target]), metadata=platform_md())
    released = await life.ReleaseTenant(lpb.ReleaseTenantRequest(tenant_id=tenant_id, tier=TIERS[source],
                                                                 current_tier=TIERS[target]), metadata=platform_md())
    assert [(t.table, t.rows) for t in released.deleted] == [(t.table, t.rows) for t in verified.source if t.rows]
    again = await life.ReleaseTenant(lpb.ReleaseTenantRequest(tenant_id=tenant_id, tier=TIERS[source],
                                                              current_tier=TIERS[target]), metadata=platform_md())
    assert not again.deleted
    return verified


async def stores_of(admin_url: str, main: str, tenant_id: str) -> dict:
    """Superuser view: the tenant's rows in the main database, and whether its schema / database exist."""
    admin = create_async_engine(admin_url, poolclass=NullPool)
    try:
        async with admin.connect() as conn:
            silo = bool(await conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"),
                                          {"n": silo_database(main, tenant_id)}))
    finally:
        await admin.dispose()
    engine = create_async_engine(admin.url.set(database=main), poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            schema = bool(await conn.scalar(text("SELECT 1 FROM pg_namespace WHERE nspname = :n"),
                                            {"n": bridge_schema(tenant_id)}))
            pooled = await conn.scalar(text("SELECT count(*) FROM public.state_events WHERE tenant_id = :t"),
                                       {"t": tenant_id})
    finally:
        await engine.dispose()
    return {"pooled_events": pooled, "schema": schema, "silo": silo}


async def test_pooled_bridge_silo_pooled_under_a_live_writer(postgres):
    urls = await postgres.create_database("migrate_state")
    db = await Database.open(urls.app_url, migrations=str(MIGRATIONS), owner_url=urls.owner_url)
    envelope = make_envelope(db, LocalDataKeyProvider(secrets.token_bytes(32)))
    running = await serve_state(db=db, envelope=envelope, verifier=TOKENS.verifier)
    channel = grpc.aio.insecure_channel(running.address)
    state = state_pb2_grpc.StateServiceStub(channel)
    life = lifecycle_pb2_grpc.TenantLifecycleServiceStub(channel)
    main = urls.app_url.rsplit("/", 1)[1].split("?")[0]
    try:
        tenant = f"t_mig{secrets.token_hex(4)}"
        md = TOKENS.metadata(tenant, tier="pooled")  # issued before every move; it keeps working throughout
        await state.CreateThread(st.CreateThreadRequest(thread_id="live", labels={"k": "v"}), metadata=md)
        await state.PutContext(st.PutContextRequest(scope=SCOPE, key="canary", value=b"ctx-value"), metadata=md)
        bystanders = {tier: f"t_by{tier}{secrets.token_hex(3)}" for tier in TIERS}
        for tier, other in bystanders.items():
            omd = TOKENS.metadata(other, tier=tier)
            await state.CreateThread(st.CreateThreadRequest(thread_id="live"), metadata=omd)
            await state.AppendEvents(st.AppendEventsRequest(thread_id="live", events=[
                st.NewEvent(type="message", payload=b"theirs")] * 5), metadata=omd)
        before = {tier: await inventory(life, other, tier) for tier, other in bystanders.items()}

        writer = Writer(state, md, "live")
        task = asyncio.create_task(writer.run())
        hops = [("pooled", "bridge"), ("bridge", "silo"), ("silo", "pooled")]
        try:
            for i, (source, target) in enumerate(hops):
                await asyncio.sleep(0.3)  # some writes land at the source first
                await move(life, tenant, source, target, twice=i == 0)
                seen = await stores_of(postgres.admin_url, main, tenant)
                assert seen["schema"] == (target == "bridge") and seen["silo"] == (target == "silo"), seen
                assert (seen["pooled_events"] > 0) == (target == "pooled"), seen
            await asyncio.sleep(0.3)  # and some after the last switch
        finally:
            writer.stop()
            await task
        assert writer.errors == []
        assert len(writer.pauses) >= len(hops) and max(writer.pauses) < 5.0, writer.pauses

        # Every acknowledged event exactly once, in order, still decrypting; read with the same old token.
        got, after = [], 0
        while True:
            page = await state.ReadEvents(st.ReadEventsRequest(thread_id="live", after_version=after, page_size=1000),
                                          metadata=md)
            got.extend(e.payload for e in page.events)
            if not page.events:
                break
            after = page.events[-1].version
        assert got == writer.acked
        ctx = await state.GetContext(st.GetContextRequest(scope=SCOPE, key="canary"), metadata=md)
        assert ctx.entry.value == b"ctx-value"
        # A token minted after the move, claiming the tier the tenant has now, reads the same.
        fresh = await state.ReadEvents(st.ReadEventsRequest(thread_id="live", page_size=5),
                                       metadata=TOKENS.metadata(tenant, tier="pooled"))
        assert [e.payload for e in fresh.events] == writer.acked[:5]
        for tier, other in bystanders.items():
            assert await inventory(life, other, tier) == before[tier]
        print(f"\nmigration pauses seen by the writer (s): {[round(p, 3) for p in writer.pauses]}; "
              f"{len(writer.acked)} events")
    finally:
        await channel.close()
        await running.stop(0.5)
        envelope.forget()
        await db.close()


async def test_abort_leaves_the_tenant_where_it_was(postgres):
    """Copy to silo, then switch back to pooled (the abort): writes resume at pooled, the partial copy is
    released, nothing of the tenant is lost."""
    urls = await postgres.create_database("migrate_abort")
    db = await Database.open(urls.app_url, migrations=str(MIGRATIONS), owner_url=urls.owner_url)
    envelope = make_envelope(db, None)
    running = await serve_state(db=db, envelope=envelope, verifier=TOKENS.verifier)
    channel = grpc.aio.insecure_channel(running.address)
    state = state_pb2_grpc.StateServiceStub(channel)
    life = lifecycle_pb2_grpc.TenantLifecycleServiceStub(channel)
    main = urls.app_url.rsplit("/", 1)[1].split("?")[0]
    try:
        tenant = f"t_ab{secrets.token_hex(4)}"
        md = TOKENS.metadata(tenant, tier="pooled")
        await state.CreateThread(st.CreateThreadRequest(thread_id="x"), metadata=md)
        await state.AppendEvents(st.AppendEventsRequest(thread_id="x", events=[st.NewEvent(type="m", payload=b"a")]),
                                 metadata=md)
        start = await inventory(life, tenant, "pooled")
        await life.CopyTenant(lpb.CopyTenantRequest(tenant_id=tenant, tier=TIERS["pooled"], target_tier=TIERS["silo"]),
                              metadata=platform_md())
        with pytest.raises(grpc.aio.AioRpcError) as err:  # paused meanwhile
            await state.AppendEvents(st.AppendEventsRequest(thread_id="x", events=[st.NewEvent(type="m", payload=b"b")]),
                                     metadata=md)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_details(err.value)["reason"] == "TENANT_MIGRATING"
        # Releasing the store the tenant is still routed to is refused.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await life.ReleaseTenant(lpb.ReleaseTenantRequest(tenant_id=tenant, tier=TIERS["pooled"],
                                                              current_tier=TIERS["silo"]), metadata=platform_md())
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_details(err.value)["reason"] == "NOT_SWITCHED"
        await life.SwitchTenant(lpb.SwitchTenantRequest(tenant_id=tenant, tier=TIERS["pooled"]), metadata=platform_md())
        await state.AppendEvents(st.AppendEventsRequest(thread_id="x", events=[st.NewEvent(type="m", payload=b"b")]),
                                 metadata=md)
        assert (await stores_of(postgres.admin_url, main, tenant))["silo"]
        released = await life.ReleaseTenant(lpb.ReleaseTenantRequest(tenant_id=tenant, tier=TIERS["silo"],
                                                                     current_tier=TIERS["pooled"]), metadata=platform_md())
        assert sum(t.rows for t in released.deleted) == sum(r for r, _ in start.values())
        seen = await stores_of(postgres.admin_url, main, tenant)
        assert seen == {"pooled_events": 2, "schema": False, "silo": False}
    finally:
        await channel.close()
        await running.stop(0.5)
        await db.close()


async def test_migration_calls_refuse_bad_input_and_tenants(postgres):
    urls = await postgres.create_database("migrate_bad")
    db = await Database.open(urls.app_url, migrations=str(MIGRATIONS), owner_url=urls.owner_url)
    running = await serve_state(db=db, envelope=make_envelope(db, None), verifier=TOKENS.verifier)
    channel = grpc.aio.insecure_channel(running.address)
    life = lifecycle_pb2_grpc.TenantLifecycleServiceStub(channel)
    try:
        tid = f"t_bad{secrets.token_hex(3)}"
        P, B = TIERS["pooled"], TIERS["bridge"]
        cases = [
            (life.CopyTenant, lpb.CopyTenantRequest(tenant_id=tid, tier=P, target_tier=P), "SAME_TIER"),
            (life.CopyTenant, lpb.CopyTenantRequest(tenant_id=tid, tier=P), "INVALID_TIER"),
            (life.CopyTenant, lpb.CopyTenantRequest(tenant_id=tid, tier=P, target_tier=99), "INVALID_TIER"),
            (life.CopyTenant, lpb.CopyTenantRequest(tenant_id=tid, tier=P, target_tier=B, pause_seconds=121),
             "PAUSE_OUT_OF_RANGE"),
            (life.CopyTenant, lpb.CopyTenantRequest(tenant_id="x; drop", tier=P, target_tier=B), "INVALID_TENANT_ID"),
            (life.VerifyTenant, lpb.VerifyTenantRequest(tenant_id=tid, tier=B, target_tier=B), "SAME_TIER"),
            (life.VerifyTenant, lpb.VerifyTenantRequest(tenant_id=tid, target_tier=B), "INVALID_TIER"),
            (life.SwitchTenant, lpb.SwitchTenantRequest(tenant_id=tid), "INVALID_TIER"),
            (life.ReleaseTenant, lpb.ReleaseTenantRequest(tenant_id=tid, tier=P), "INVALID_TIER"),
            (life.CopyTenant, lpb.CopyTenantRequest(tenant_id=tid, tier=P, target_tier=B, target_region="EU; x"),
             "UNKNOWN_REGION"),
            (life.VerifyTenant, lpb.VerifyTenantRequest(tenant_id=tid, tier=P, target_tier=B, region="-"),
             "UNKNOWN_REGION"),
            (life.SwitchTenant, lpb.SwitchTenantRequest(tenant_id=tid, tier=B, region="x" * 40), "UNKNOWN_REGION"),
            (life.ReleaseTenant, lpb.ReleaseTenantRequest(tenant_id=tid, tier=P, current_tier=B,
                                                          current_region="Eu"), "UNKNOWN_REGION"),
        ]
        for call, req, reason in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(req, metadata=platform_md())
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (req, err.value.details())
            assert error_details(err.value)["reason"] == reason, req
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await life.SwitchTenant(lpb.SwitchTenantRequest(tenant_id="t_platform", tier=P), metadata=platform_md())
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # A well-formed region this service has no database for: nothing is copied or switched.
        for call, req in [(life.CopyTenant, lpb.CopyTenantRequest(tenant_id=tid, tier=P, target_tier=P,
                                                                  target_region="mars")),
                          (life.SwitchTenant, lpb.SwitchTenantRequest(tenant_id=tid, tier=P, region="mars"))]:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(req, metadata=platform_md())
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
            assert error_details(err.value)["reason"] == "REGION_NOT_CONFIGURED"
        # Tenants (even with every scope) never reach these calls, for themselves or another tenant.
        for who in (TOKENS.metadata(tid), TOKENS.metadata("t_other")):
            for call, req in [(life.CopyTenant, lpb.CopyTenantRequest(tenant_id=tid, tier=P, target_tier=B)),
                              (life.VerifyTenant, lpb.VerifyTenantRequest(tenant_id=tid, tier=P, target_tier=B)),
                              (life.SwitchTenant, lpb.SwitchTenantRequest(tenant_id=tid, tier=B)),
                              (life.ReleaseTenant, lpb.ReleaseTenantRequest(tenant_id=tid, tier=P, current_tier=B))]:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(req, metadata=who)
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await channel.close()
        await running.stop(0.5)
        await db.close()

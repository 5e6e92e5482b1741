"""Tier migration under `bulkhead up --replicas 2` on Postgres (real processes): a writer sends each append
to the other state replica in turn (a token issued before the move: its tier claim says pooled) through
pooled -> bridge; then state#2 is SIGKILLed and the supervisor restarts it; then bridge -> pooled.

`bulkhead up --postgres` gives every service the same database, so a bridge tenant's schema holds every
service's tables: the way back ends with the schema gone, released service by service (the first service's
release used to drop it whole, and every later service's ReleaseTenant failed INTERNAL: stuck "releasing").

Every acknowledged write is there exactly once, read through either replica; the writer saw only retried
TENANT_MIGRATING pauses; the restarted replica routes the old token to the bridge schema from its first
answer (the pooled rows are released: routed by the claim it would read nothing). The writer pauses
around the kill, so no write is in flight on the killed replica (an unacknowledged write that committed
would count twice).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from bulkhead.client import Client
from bulkhead.client._credentials import RefreshingToken
from bulkhead.identity.v1 import identity_pb2 as idp
from bulkhead.state.v1 import state_pb2 as st
from bulkhead.state.v1 import state_pb2_grpc
from shared.db import bridge_schema
from testkit.fake_anthropic import FakeAnthropic
from tests.e2e.test_replicas import replica_pids, start_replicated
from tests.lifecycle.test_migrate_mesh import read_all
from tests.lifecycle.test_migrate_postgres import Writer
from tests.services.orchestrator.mesh import TIERS

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


class RoundRobin:
    def __init__(self, *stubs) -> None:
        self._next = itertools.cycle(stubs)

    def __getattr__(self, name):
        return getattr(next(self._next), name)


async def _migrate(operator, tenant_id: str, target: str) -> idp.TenantMigration:
    await operator.identity.MigrateTenant(idp.MigrateTenantRequest(tenant_id=tenant_id, target_tier=TIERS[target]))
    deadline = time.monotonic() + 120
    while True:
        got = (await operator.identity.GetMigration(idp.GetMigrationRequest(tenant_id=tenant_id))).migration
        if got.state == idp.MIGRATION_STATE_DONE:
            return got
        assert time.monotonic() < deadline, (got.last_error, [(x.service, x.phase, x.last_error) for x in got.steps])
        await asyncio.sleep(0.2)


async def _schema_exists(url: str, schema: str) -> bool:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            return bool(await conn.scalar(text("SELECT 1 FROM pg_namespace WHERE nspname = :n"), {"n": schema}))
    finally:
        await engine.dispose()


async def _read_when_up(stub, md) -> list[bytes]:
    deadline = time.monotonic() + 60
    while True:
        try:
            return await read_all(stub, md, "live")
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


async def test_two_replicas_of_everything_pooled_to_bridge_a_restart_and_back(tmp_path, postgres):
    urls = await postgres.create_database("mig_replicas")
    async with FakeAnthropic() as fake:
        mesh, addresses = await asyncio.to_thread(
            start_replicated,
            tmp_path / "mesh",
            {
                "ANTHROPIC_API_KEY": "sk-ant-fake",
                "ANTHROPIC_BASE_URL": fake.base_url,
                "BULKHEAD_MODEL_PROVIDER": "anthropic",
            },
            ("--postgres", urls.app_url, "--postgres-owner", urls.owner_url),
        )
        channels = []
        try:
            state_addrs = addresses["state"].removeprefix("ipv4:").split(",")
            assert len(state_addrs) == 2, addresses
            operator_key = (mesh.data_dir / "operator.key").read_text().strip()
            async with await Client.connect(api_key=operator_key, addresses=addresses) as operator:
                created = await operator.identity.CreateTenant(idp.CreateTenantRequest(name="mover"))
                tenant_id = created.tenant.id
                identity = grpc.aio.insecure_channel(addresses["identity"].removeprefix("ipv4:").split(",")[0])
                channels.append(identity)
                token, _ = await RefreshingToken(identity, created.admin_api_key).current()
                md = (("authorization", f"Bearer {token}"), ("x-tenant-id", tenant_id))  # claims pooled
                stubs = []
                for addr in state_addrs:
                    ch = grpc.aio.insecure_channel(addr)
                    channels.append(ch)
                    stubs.append(state_pb2_grpc.StateServiceStub(ch))
                await stubs[0].CreateThread(st.CreateThreadRequest(thread_id="live"), metadata=md)
                pauses, acked, retried = [], [], []
                for target in ("bridge", "pooled"):
                    writer = Writer(RoundRobin(*stubs), md, "live")
                    task = asyncio.create_task(writer.run())
                    try:
                        await asyncio.sleep(1)
                        done = await _migrate(operator, tenant_id, target)
                        pauses.append(done.pause_ms)
                        await asyncio.sleep(1)
                    finally:
                        writer.stop()
                        await task
                    assert writer.errors == [], writer.errors
                    acked += writer.acked
                    retried += writer.pauses
                    if target == "bridge":  # state#2 killed and restarted by the supervisor: no writes in flight
                        os.kill(replica_pids(mesh)["state#2"], signal.SIGKILL)
                        await asyncio.sleep(1)
                        assert await _read_when_up(stubs[1], md) == acked
                assert await read_all(stubs[0], md, "live") == acked
                assert await read_all(stubs[1], md, "live") == acked
                assert not await _schema_exists(urls.owner_url, bridge_schema(tenant_id))  # every service released
                print(
                    f"\nreplicas under bulkhead up: pauses (ms) {pauses}; writer's retried pauses (s) "
                    f"{[round(p, 3) for p in retried]}; {len(acked)} events"
                )
        finally:
            for ch in channels:
                await ch.close()
            mesh.stop()

"""MigrateTenant with two replicas of state on real Postgres (the whole mesh, credentials on OpenBao):
pooled -> bridge -> pooled with a live writer going through both replicas in turn.

Identity's coordinator calls only one replica (its peer address); the other learns the pause and the
new placement from the feed it polls (ListRevokedTokens). Every acknowledged write is at the target
exactly once (none lost at the source by the replica identity never called, none routed there by the
writer's pre-migration token after the switch), the writer saw only bounded retried TENANT_MIGRATING
pauses, and a replica started after the switch routes that pre-migration token (its tier claim:
pooled) to the tenant's bridge schema from its first request on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import grpc
import pytest
from prometheus_client import CollectorRegistry

from bulkhead.identity.v1 import identity_pb2 as idn
from bulkhead.state.v1 import state_pb2 as st
from bulkhead.state.v1 import state_pb2_grpc
from services.identity.peers import PlatformCaller
from services.metering import server as metering_server
from testkit.fake_anthropic import FakeAnthropic
from tests.lifecycle.pg_mesh import running_pg_mesh
from tests.lifecycle.test_delete_mesh import addresses, inventories
from tests.lifecycle.test_migrate_mesh import read_all, wait_migration
from tests.lifecycle.test_migrate_postgres import Writer
from tests.services.orchestrator.mesh import TIERS

pytestmark = [pytest.mark.postgres, pytest.mark.openbao, pytest.mark.slow]


class RoundRobin:
    """A StateService stub that sends each call to the next replica."""

    def __init__(self, *stubs) -> None:
        self._next = itertools.cycle(stubs)
        self.calls = 0

    def __getattr__(self, name):
        self.calls += 1
        return getattr(next(self._next), name)


async def start_state_replica(mesh, stack):
    from services.state.config import StateConfig
    from services.state.server import start as start_state

    replica = await start_state(StateConfig.from_env(mesh.env), mesh.verifier(), address="127.0.0.1:0")
    stack.push_async_callback(replica.stop, 0)
    return replica


async def test_two_state_replicas_pooled_bridge_pooled(tmp_path, postgres, openbao, monkeypatch):
    # metering's start() registers its counters in the process-wide registry: a fresh one, so another
    # whole mesh in this process (tests/lifecycle/test_migrate_pg_mesh.py) does not collide with it.
    monkeypatch.setattr(metering_server, "REGISTRY", CollectorRegistry())
    async with (
        FakeAnthropic() as upstream,
        running_pg_mesh(tmp_path, postgres, openbao, upstream.base_url) as mesh,
        contextlib.AsyncExitStack() as stack,
    ):
        await mesh.orchestrator.dispatcher.stop()
        mesh.identity.app.deletions.peers.update(addresses(mesh))
        other = await start_state_replica(mesh, stack)  # identity never calls this one
        named = {"identity": mesh.identity.address, **addresses(mesh)}
        channels = {s: grpc.aio.insecure_channel(a) for s, a in named.items()}
        channels["state-2"] = grpc.aio.insecure_channel(other.running.address)
        by_addr = {named[s]: c for s, c in channels.items() if s in named}
        caller = PlatformCaller(mesh.identity.app.keys)
        op = mesh.identity.operator.metadata
        try:
            t = await mesh.tenant("pooled")
            md = t.metadata  # issued before every move: its tier claim says pooled throughout
            first = state_pb2_grpc.StateServiceStub(channels["state"])
            second = state_pb2_grpc.StateServiceStub(channels["state-2"])
            await first.CreateThread(st.CreateThreadRequest(thread_id="live"), metadata=md)
            both = RoundRobin(first, second)
            writer = Writer(both, md, "live")
            task = asyncio.create_task(writer.run())
            pauses, restarted_read = [], None
            try:
                for target in ("bridge", "pooled"):
                    await asyncio.sleep(0.5)
                    await mesh.identity.stub.MigrateTenant(
                        idn.MigrateTenantRequest(tenant_id=t.tenant_id, target_tier=TIERS[target]), metadata=op
                    )
                    done = await wait_migration(mesh, t.tenant_id, timeout=120)
                    assert all(s.phase == "released" for s in done.steps), done
                    assert all(tbl.equal for s in done.steps for tbl in s.tables), done
                    assert done.generation >= 1
                    pauses.append(done.pause_ms)
                    inv = await inventories(mesh, by_addr, caller, t.tenant_id, target)
                    assert any(rows for (_, table), (rows, _) in inv["state"].items() if table == "state_events"), inv
                    if target == "bridge":
                        # A replica (re)started after the switch: the pooled claim must reach the bridge schema
                        # (the pooled rows are released: routed by the claim it would read nothing).
                        acked = len(writer.acked)
                        fresh = await start_state_replica(mesh, stack)
                        async with grpc.aio.insecure_channel(fresh.running.address) as ch:
                            restarted_read = await read_all(state_pb2_grpc.StateServiceStub(ch), md, "live")
                        assert len(restarted_read) >= acked > 0
                        assert restarted_read == writer.acked[: len(restarted_read)]
                await asyncio.sleep(0.5)
            finally:
                writer.stop()
                await task
            assert writer.errors == []
            assert both.calls > 20
            # Every acknowledged write exactly once, in order, read through either replica.
            assert await read_all(first, md, "live") == writer.acked
            assert await read_all(second, md, "live") == writer.acked
            assert writer.pauses and max(writer.pauses) < 30.0, writer.pauses
            print(
                f"\ntwo state replicas: identity-measured pauses (ms) {pauses}; writer's retried pauses (s) "
                f"{[round(p, 3) for p in writer.pauses]}; {len(writer.acked)} events; restarted replica "
                f"read {len(restarted_read or [])}"
            )
        finally:
            for ch in channels.values():
                await ch.close()

"""The orchestrator on real Postgres: migrations, RLS for raw SQL, and a full run with a delegated token."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import jwt
import pytest
from sqlalchemy import text

from bulkhead.orchestrator.v1 import orchestrator_pb2 as pb
from bulkhead.orchestrator.v1 import orchestrator_pb2_grpc
from services.orchestrator.grants import GrantSealer
from services.orchestrator.operations import RUN_SCOPES
from testkit.fake_anthropic import FakeAnthropic

from .mesh import TIERS, running_mesh, start_orchestrator_in, team_pb

pytestmark = pytest.mark.postgres


@pytest.mark.parametrize("tier", list(TIERS))
async def test_orchestrator_on_postgres_with_rls_and_delegation(tier, postgres, tmp_path):
    """Runs of every tier complete on Postgres, queued in the platform database; raw SQL as the app role
    sees one tenant (and a bridge or silo tenant's rows not at all: they live in its schema or database);
    the run token is narrow."""
    urls = await postgres.create_database(f"orch_{uuid.uuid4().hex[:6]}")
    async with (
        FakeAnthropic() as upstream,
        running_mesh(tmp_path, upstream_url=upstream.base_url, start_orchestrator=False) as mesh,
        contextlib.AsyncExitStack() as stack,
    ):
        orch = await start_orchestrator_in(
            mesh,
            stack,
            BULKHEAD_ORCHESTRATOR_DATABASE_URL=urls.app_url,
            BULKHEAD_ORCHESTRATOR_DATABASE_OWNER_URL=urls.owner_url,
        )
        a, b = await mesh.tenant(tier), await mesh.tenant(tier)
        for t in (a, b):
            await mesh.stub.CreateTeam(
                pb.CreateTeamRequest(team=team_pb(model="claude-sonnet-4-5")), metadata=t.metadata
            )
        # Hold the run in the queue long enough to read its sealed grant: stop dispatching first.
        await orch.dispatcher.stop()
        run = (await mesh.stub.StartRun(pb.StartRunRequest(team="support", input="hello"), metadata=a.metadata)).run
        async with orch.db.engine.connect() as conn:
            grant = (
                await conn.execute(text('SELECT "grant" FROM orch_run_queue WHERE run_id = :r'), {"r": run.run_id})
            ).scalar_one()
            # RLS: without app.tenant_id the app role sees no tenant rows at all; with it, only that tenant's.
            assert (await conn.execute(text("SELECT count(*) FROM orch_teams"))).scalar_one() == 0
        async with orch.db.engine.connect() as conn:
            async with conn.begin():
                await conn.execute(text("SELECT set_config('app.tenant_id', :t, true)"), {"t": b.tenant_id})
                names = (await conn.execute(text("SELECT tenant_id FROM orch_teams"))).scalars().all()
                runs = (await conn.execute(text("SELECT count(*) FROM orch_runs"))).scalar_one()
            assert names == ([b.tenant_id] if tier == "pooled" else []) and runs == 0
        key = (tmp_path / "orchestrator-grant.key").read_bytes()
        token = GrantSealer(key).open(grant, run.run_id)
        claims = jwt.decode(token, options={"verify_signature": False})
        assert set(claims["scope"].split()) == set(RUN_SCOPES)
        assert claims["tid"] == a.tenant_id and claims["act"]["sub"] and claims.get("run") == run.run_id
        assert "orchestrator.teams.write" not in claims["scope"] and "*" not in claims["scope"].split()

        # A second replica on the same database picks the run up and finishes it.
        await start_orchestrator_in(
            mesh,
            stack,
            BULKHEAD_ORCHESTRATOR_DATABASE_URL=urls.app_url,
            BULKHEAD_ORCHESTRATOR_DATABASE_OWNER_URL=urls.owner_url,
        )
        msgs = [
            m async for m in mesh.stub.WatchRun(pb.WatchRunRequest(run_id=run.run_id), metadata=a.metadata, timeout=30)
        ]
        assert msgs[-1].run.status == pb.RUN_STATUS_SUCCEEDED and upstream.request_count == 1


async def test_a_run_queued_through_one_replica_starts_on_another_at_once_by_notify(postgres, tmp_path):
    """LISTEN/NOTIFY: a replica whose dispatcher polls only every 60 s starts a run queued through another
    replica (which does not dispatch) within seconds, woken by the queue's notice rather than its poll."""
    urls = await postgres.create_database(f"orch_{uuid.uuid4().hex[:6]}")
    db_env = {
        "BULKHEAD_ORCHESTRATOR_DATABASE_URL": urls.app_url,
        "BULKHEAD_ORCHESTRATOR_DATABASE_OWNER_URL": urls.owner_url,
    }
    async with (
        FakeAnthropic() as upstream,
        running_mesh(tmp_path, upstream_url=upstream.base_url, start_orchestrator=False) as mesh,
        contextlib.AsyncExitStack() as stack,
    ):
        worker = await start_orchestrator_in(mesh, stack, poll_seconds=60, **db_env)
        await asyncio.wait_for(worker.listener.connected.wait(), 10)
        worker_stub = orchestrator_pb2_grpc.OrchestratorServiceStub(mesh.channels[-1])
        front = await start_orchestrator_in(mesh, stack, poll_seconds=60, **db_env)
        await front.dispatcher.stop()
        t = await mesh.tenant()
        await mesh.stub.CreateTeam(pb.CreateTeamRequest(team=team_pb(model="claude-sonnet-4-5")), metadata=t.metadata)
        await asyncio.sleep(0.5)  # the worker's rounds at start and on connecting are over: it sleeps for 60 s
        started = time.monotonic()
        run = (await mesh.stub.StartRun(pb.StartRunRequest(team="support", input="hello"), metadata=t.metadata)).run
        msgs = [
            m
            async for m in worker_stub.WatchRun(pb.WatchRunRequest(run_id=run.run_id), metadata=t.metadata, timeout=30)
        ]
        assert msgs[-1].run.status == pb.RUN_STATUS_SUCCEEDED and upstream.request_count == 1
        assert time.monotonic() - started < 10, "the worker waited for its poll, not for the notice"
        assert front.listener.connected.is_set()  # every replica listens, the one that queued too

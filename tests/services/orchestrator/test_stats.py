"""GetRunStats and Run.trace_id: per-agent figures computed in SQL, exact, and confined to the caller's tenant."""

from __future__ import annotations

import asyncio
import math
import random
import time
import uuid

import grpc
import pytest
from google.protobuf import timestamp_pb2
from sqlalchemy import make_url

from bulkhead.orchestrator.v1 import orchestrator_pb2 as pb
from services.orchestrator.history import Finished
from services.orchestrator.runs import RunStatus
from services.orchestrator.server import MIGRATIONS
from services.orchestrator.stats import RunStats
from services.orchestrator.steps import Step, StepKind
from services.orchestrator.store import RunStore, trace_id_of
from services.orchestrator.team import AgentSpec, TeamSpec
from shared.db import Database
from shared.db.migrations import upgrade
from shared.errors import error_details
from shared.tenancy import TenantContext, tenant_scope
from testkit.dialects import DIALECTS, open_migrated

from .mesh import team_pb

TEAM = TeamSpec(name="t", agents=(AgentSpec("triage", handoffs=("billing",)), AgentSpec("billing")))
T0 = time.time() - 7200  # steps of the workload fall in [T0, T0 + 1 h); runs are created now


@pytest.fixture(params=DIALECTS)
async def db(request, tmp_path):
    """The orchestrator's database on each backend, migrated."""
    database = await open_migrated(request, tmp_path, MIGRATIONS, "orch_stats")
    yield database
    await database.close()


def _ctx(tid: str) -> TenantContext:
    return TenantContext(tenant_id=tid, principal_id="p", scopes=frozenset({"*"}), tier="pooled")


def nearest_rank(values: list[float], q: int) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered) / 100)) - 1]


async def _workload(db: Database, tid: str, rng: random.Random, runs_n: int) -> dict[str, list[float]]:
    """Runs of tenant tid with random step times and outcomes; returns agent -> expected latencies (ms)."""
    store, expected = RunStore(db), {}
    with tenant_scope(_ctx(tid)):
        for i in range(runs_n):
            entry = rng.choice(["triage", "billing"])
            run, *_ = await store.start(
                team=TEAM,
                entry_agent=entry,
                run_input="x",
                idempotency_key="",
                tenant_id=tid,
                principal_id="p",
                tier="pooled",
                grant=b"g",
            )
            outcome = rng.choice(["succeeded", "failed", "cancelled", None, None])
            if outcome or rng.random() < 0.5:
                await store.update(run.run_id, status=RunStatus.RUNNING)
            at, steps = T0 + i, [Step(1, StepKind.RUN_STARTED, entry, created_at=T0 + i)]
            for idx in range(2, rng.randint(2, 6)):
                at += rng.randint(1, 5000) / 1000
                agent = rng.choice(["triage", "billing"])
                steps.append(Step(idx, StepKind.MODEL_CALL, agent, created_at=at))
                expected.setdefault(agent, []).append((at - steps[-2].created_at) * 1000)
            finished = None
            if outcome:
                steps.append(Step(len(steps) + 1, StepKind.RUN_FINISHED, entry, created_at=at + 9))
                finished = Finished(outcome, "", "", "")
            # Two batches: the second's first latency needs the stored step before it.
            await store.record_steps(run.run_id, steps[:2], current_agent=entry, finished=None)
            await store.record_steps(run.run_id, steps[2:], current_agent=entry, finished=finished)
    return expected


async def test_stats_are_exact_and_confined_to_the_tenant(db):
    """Percentiles equal nearest rank over every step; run counts match; B's runs never change A's figures."""
    rng = random.Random(14)
    a, b = f"t_a_{uuid.uuid4().hex[:6]}", f"t_b_{uuid.uuid4().hex[:6]}"
    expected = await _workload(db, a, rng, 40)
    stats = RunStats(db)
    with tenant_scope(_ctx(a)):
        before = await stats.per_agent(T0 - 1, time.time() + 60)
    await _workload(db, b, rng, 40)
    with tenant_scope(_ctx(a)):
        after = await stats.per_agent(T0 - 1, time.time() + 60)
        runs = (await RunStore(db).list(page_size=200, page_token="", status=None, team="")).items
    assert before == after
    by_agent = {s.agent: s for s in after}
    assert set(by_agent) == {"triage", "billing"}
    for agent, lat in expected.items():
        s = by_agent[agent]
        assert (s.latency_steps, s.p50_ms, s.p95_ms) == (
            len(lat),
            pytest.approx(nearest_rank(lat, 50)),
            pytest.approx(nearest_rank(lat, 95)),
        )
        mine = [r for r in runs if r.entry_agent == agent]
        assert s.succeeded == sum(r.status == "succeeded" for r in mine)
        assert s.failed == sum(r.status == "failed" for r in mine)
        assert s.queued_now == sum(r.status == "queued" for r in mine)
        assert s.running_now == sum(r.status == "running" for r in mine)
        assert (s.queued, s.running) == (s.queued_now, s.running_now)
    assert sum(s.succeeded + s.failed + s.cancelled + s.queued + s.running for s in after) == 40
    with tenant_scope(_ctx(a)):  # a window before every run has no figures but the unfinished runs now
        empty = await stats.per_agent(T0 - 100, T0 - 1)
    assert [s.agent for s in empty] == [s.agent for s in after if s.queued_now or s.running_now]
    assert all(s.succeeded == s.failed == s.latency_steps == 0 for s in empty)


def test_trace_id_of_takes_the_trace_id_of_a_w3c_traceparent():
    """Only a well-formed, non-zero trace id is kept."""
    tid = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_id_of(f"00-{tid}-00f067aa0ba902b7-01") == tid
    for bad in ("", "garbage", f"00-{tid.upper()}-00f067aa0ba902b7-01", f"00-{'0' * 32}-00f067aa0ba902b7-01"):
        assert trace_id_of(bad) == ""


# --- through the real server -------------------------------------------------------------------

pytestmark_api = pytest.mark.asyncio(loop_scope="module")


def _window(start: float | None, end: float | None) -> pb.GetRunStatsRequest:
    req = pb.GetRunStatsRequest()
    if start is not None:
        req.start_time.CopyFrom(timestamp_pb2.Timestamp(seconds=int(start)))
    if end is not None:
        req.end_time.CopyFrom(timestamp_pb2.Timestamp(seconds=int(end)))
    return req


@pytestmark_api
async def test_get_run_stats_shows_only_the_callers_agents(bare_mesh):
    """A sees its queued runs under its entry agent; B, with none, sees no agents at all."""
    stub, a, b = bare_mesh.stub, await bare_mesh.tenant(), await bare_mesh.tenant()
    await stub.CreateTeam(pb.CreateTeamRequest(team=team_pb()), metadata=a.metadata)
    run = (await stub.StartRun(pb.StartRunRequest(team="support", input="hi"), metadata=a.metadata)).run
    now = time.time()
    got = (await stub.GetRunStats(_window(now - 3600, now + 60), metadata=a.metadata)).agents
    assert [(s.agent, s.queued, s.queued_now, s.succeeded) for s in got] == [(run.entry_agent, 1, 1, 0)]
    assert not (await stub.GetRunStats(_window(now - 3600, now + 60), metadata=b.metadata)).agents


@pytestmark_api
@pytest.mark.parametrize(
    ("start", "end", "field"),
    [
        (None, 1000, "start_time"),
        (1000, None, "end_time"),
        (2000, 1000, "end_time"),
        (1000, 1000, "end_time"),
        (0, 32 * 86400, "end_time"),
    ],
)
async def test_get_run_stats_bad_windows_name_the_field(bare_mesh, start, end, field):
    """A missing, inverted, empty or longer-than-31-days window is INVALID_ARGUMENT naming the field."""
    a = await bare_mesh.tenant()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await bare_mesh.stub.GetRunStats(_window(start, end), metadata=a.metadata)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error_details(info.value)["bad_request"]


@pytestmark_api
async def test_run_carries_the_trace_id_of_its_start_run(bare_mesh):
    """StartRun's traceparent becomes Run.trace_id on GetRun and ListRuns; an untraced run has none."""
    stub, a = bare_mesh.stub, await bare_mesh.tenant()
    await stub.CreateTeam(pb.CreateTeamRequest(team=team_pb()), metadata=a.metadata)
    trace = uuid.uuid4().hex
    traced = (
        await stub.StartRun(
            pb.StartRunRequest(team="support", input="hi"),
            metadata=(*a.metadata, ("traceparent", f"00-{trace}-00f067aa0ba902b7-01")),
        )
    ).run
    got = (await stub.GetRun(pb.GetRunRequest(run_id=traced.run_id), metadata=a.metadata)).run
    listed = (await stub.ListRuns(pb.ListRunsRequest(), metadata=a.metadata)).runs
    assert got.trace_id == listed[0].trace_id == trace


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def urls_at_0002(request, tmp_path):
    """(runtime url, owner url, runtime role) of an orchestrator database migrated to 0002."""
    if request.param == "sqlite":
        url = owner = f"sqlite+aiosqlite:///{tmp_path / 'o.db'}"
        role = None
    else:
        urls = await request.getfixturevalue("postgres").create_database(f"orch_backfill_{uuid.uuid4().hex[:6]}")
        url, owner, role = urls.app_url, urls.owner_url, make_url(str(urls.app_url)).username
    await asyncio.to_thread(upgrade, owner, MIGRATIONS, app_role=role, revision="0002")
    return url, owner, role


async def test_migration_backfills_step_latency_from_stored_steps(urls_at_0002):
    """Steps stored before 0003 get their agent, time and latency from their payloads (under FORCE'd RLS)."""
    url, owner, role = urls_at_0002
    tid, at = f"t_{uuid.uuid4().hex[:6]}", time.time() - 60
    steps = [
        Step(1, StepKind.RUN_STARTED, "triage", created_at=at),
        Step(2, StepKind.MODEL_CALL, "triage", created_at=at + 0.25),
        Step(3, StepKind.MODEL_CALL, "billing", created_at=at + 1.25),
        Step(4, StepKind.RUN_FINISHED, "billing", created_at=at + 9),
    ]
    db = await Database.open(url)
    try:
        with tenant_scope(_ctx(tid)):
            async with db.raw(write=True) as tx:
                for s in steps:
                    await tx.execute(
                        "INSERT INTO orch_steps (tenant_id, run_id, idx, payload) VALUES ($1, $2, $3, $4)",
                        tid,
                        "r_old",
                        s.index,
                        s.to_json().decode(),
                    )
    finally:
        await db.close()
    await asyncio.to_thread(upgrade, owner, MIGRATIONS, app_role=role)
    db = await Database.open(url)
    try:
        with tenant_scope(_ctx(tid)):
            got = await RunStats(db).per_agent(at - 1, time.time() + 1)
    finally:
        await db.close()
    assert [(s.agent, s.latency_steps, round(s.p50_ms), round(s.p95_ms)) for s in got] == [
        ("billing", 1, 1000, 1000),
        ("triage", 1, 250, 250),
    ]

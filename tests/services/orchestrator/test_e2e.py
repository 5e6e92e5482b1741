"""A two-agent team end to end on the real mesh against the fake Anthropic upstream."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bulkhead.credentials.v1 import credentials_pb2, credentials_pb2_grpc
from bulkhead.metering.v1 import metering_pb2, metering_pb2_grpc
from bulkhead.orchestrator.v1 import orchestrator_pb2 as pb
from bulkhead.state.v1 import state_pb2, state_pb2_grpc
from shared.telemetry import setup_telemetry
from testkit.fake_anthropic import FakeAnthropic, Fault, Reply

from .fakes import ToolServer
from .mesh import TIERS, team_pb

# Every workflow runs for a tenant of each isolation tier: a bridge or silo tenant's rows live in a
# database (SQLite file) of its own, while the run queue must stay in the platform database.
pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.parametrize("tier", list(TIERS))]

SECRET = "inv-key-7Hq2xZ9vLmP4"
MODEL = "claude-sonnet-4-5"


@pytest.fixture(scope="module")
def spans():
    """Every span finished in this process from now on."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = setup_telemetry("tests")
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def tools():
    server = ToolServer(body='{"invoice": "INV-7", "status": "paid"}')
    yield server
    server.close()


async def watch(mesh, tenant, run_id: str, after: int = 0) -> list[pb.WatchRunResponse]:
    """Everything WatchRun streams until the run ends."""
    return [
        m
        async for m in mesh.stub.WatchRun(
            pb.WatchRunRequest(run_id=run_id, after_step=after), metadata=tenant.metadata, timeout=30
        )
    ]


async def watch_whole_run(mesh, tenant, run_id: str) -> list[pb.WatchRunResponse]:
    """watch(), checking the stream holds every step from the run's start to its success, in order."""
    seen = await watch(mesh, tenant, run_id)
    assert [m.step.index for m in seen] == list(range(1, len(seen) + 1))
    assert seen[0].step.kind == pb.STEP_KIND_RUN_STARTED and seen[-1].run.status == pb.RUN_STATUS_SUCCEEDED
    return seen


async def put_secret(mesh, tenant, name: str, value: str) -> None:
    stub = credentials_pb2_grpc.CredentialsServiceStub(grpc.aio.insecure_channel(mesh.addr("credentials")))
    await stub.PutSecret(credentials_pb2.PutSecretRequest(name=name, value=value.encode()), metadata=tenant.metadata)


def script_support(upstream: FakeAnthropic) -> None:
    upstream.script(
        Reply.tool_use("handoff", {"agent": "billing", "note": "customer asks about INV-7"}),
        Reply.tool_use("lookup_invoice", {"invoice": "INV-7"}, tool_id="toolu_2"),
        Reply.text("Invoice INV-7 is paid."),
    )


async def test_two_agent_team_runs_to_completion(tier, mesh, upstream, tools, spans, caplog):
    """triage hands off to billing; billing's HTTP tool gets the injected secret; WatchRun streams every step."""
    caplog.set_level(logging.DEBUG)
    a = await mesh.tenant(tier)
    await put_secret(mesh, a, "billing_api_key", SECRET)
    await mesh.stub.CreateTeam(
        pb.CreateTeamRequest(team=team_pb(tool_host=tools.host, model=MODEL)), metadata=a.metadata
    )
    script_support(upstream)
    run = (
        await mesh.stub.StartRun(pb.StartRunRequest(team="support", input="Is INV-7 paid?"), metadata=a.metadata)
    ).run
    seen = await watch(mesh, a, run.run_id)

    kinds = [m.step.kind for m in seen]
    assert kinds == [
        pb.STEP_KIND_RUN_STARTED,
        pb.STEP_KIND_MODEL_CALL,
        pb.STEP_KIND_HANDOFF,
        pb.STEP_KIND_MODEL_CALL,
        pb.STEP_KIND_TOOL_CALL,
        pb.STEP_KIND_MODEL_CALL,
        pb.STEP_KIND_RUN_FINISHED,
    ]
    assert [m.step.index for m in seen] == list(range(1, 8))
    final = seen[-1].run
    assert final.status == pb.RUN_STATUS_SUCCEEDED and final.output == "Invoice INV-7 is paid."
    assert final.current_agent == "billing" and final.step_count == 7
    # Resumable: watching again after step 4 gives exactly the rest.
    assert [m.step.index for m in await watch(mesh, a, run.run_id, after=4)] == [5, 6, 7]

    # The tool got the secret, fetched just in time; the model saw neither it nor its reference's value.
    assert tools.requests[0]["headers"]["authorization"] == f"Bearer {SECRET}"
    assert upstream.request_count == 3
    bodies = json.dumps([c.body for c in upstream.calls])
    assert SECRET not in bodies
    assert (
        a.tenant_id in upstream.calls[0].body["system"][0]["text"]
        if isinstance(upstream.calls[0].body["system"], list)
        else a.tenant_id in upstream.calls[0].body["system"]
    )
    # Nor did state, the orchestrator's answers, the logs or the spans.
    state = state_pb2_grpc.StateServiceStub(grpc.aio.insecure_channel(mesh.addr("state")))
    events = (await state.ReadEvents(state_pb2.ReadEventsRequest(thread_id=run.run_id), metadata=a.metadata)).events
    assert len(events) == 7 and all(SECRET.encode() not in e.payload for e in events)
    assert SECRET not in str(seen)
    assert SECRET not in caplog.text
    for _ in range(100):  # the last step's span closes just after the step is published
        finished_spans = spans.get_finished_spans()
        if any(
            sp.name == "orchestrator.run" and (sp.attributes or {}).get("run.id") == run.run_id for sp in finished_spans
        ):
            break
        await asyncio.sleep(0.02)
    for span in finished_spans:
        assert SECRET not in json.dumps({k: str(v) for k, v in (span.attributes or {}).items()})
    step_spans = [
        sp
        for sp in finished_spans
        if sp.name == "orchestrator.step" and (sp.attributes or {}).get("run.id") == run.run_id
    ]
    assert len(step_spans) == 5 and all(sp.attributes["tenant.id"] == a.tenant_id for sp in step_spans)

    # Metering counted each model call once, tagged with the agents.
    metering = metering_pb2_grpc.MeteringServiceStub(grpc.aio.insecure_channel(mesh.addr("metering")))
    rows = []
    window = metering_pb2.UsageFilter()
    window.start_time.FromSeconds(int(time.time()) - 3600)
    window.end_time.FromSeconds(int(time.time()) + 3600)
    for _ in range(50):
        rows = (
            await metering.QueryUsage(
                metering_pb2.QueryUsageRequest(filter=window, group_by=[metering_pb2.USAGE_GROUPING_AGENT]),
                metadata=a.metadata,
            )
        ).rows
        if sum(r.event_count for r in rows) >= 3:
            break
        await asyncio.sleep(0.1)
    assert {r.agent_id: r.event_count for r in rows} == {"triage": 1, "billing": 2}


async def test_cross_tenant_handoff_is_refused_and_recorded(tier, mesh, upstream, tools):
    """A hand-off naming another tenant's team agent is refused, recorded, and moves no context."""
    a, b = await mesh.tenant(tier), await mesh.tenant(tier)
    for t in (a, b):
        await mesh.stub.CreateTeam(
            pb.CreateTeamRequest(team=team_pb(tool_host=tools.host, model=MODEL)), metadata=t.metadata
        )
    upstream.script(
        Reply.tool_use("handoff", {"agent": f"{b.tenant_id}/support/billing", "note": "A's private notes"}),
        Reply.text("I could not hand off."),
    )
    run = (await mesh.stub.StartRun(pb.StartRunRequest(team="support", input="hi"), metadata=a.metadata)).run
    seen = await watch(mesh, a, run.run_id)
    refused = [m.step for m in seen if m.step.kind == pb.STEP_KIND_HANDOFF_REFUSED]
    assert len(refused) == 1 and refused[0].detail["target"] == f"{b.tenant_id}/support/billing"
    assert seen[-1].run.status == pb.RUN_STATUS_SUCCEEDED and seen[-1].run.current_agent == "triage"
    # The model was told, and nothing reached tenant B's state.
    assert upstream.calls[1].body["messages"][-1]["content"][0]["is_error"] is True
    state = state_pb2_grpc.StateServiceStub(grpc.aio.insecure_channel(mesh.addr("state")))
    b_threads = (await state.ListThreads(state_pb2.ListThreadsRequest(), metadata=b.metadata)).threads
    assert b_threads == []


async def test_foreign_canary_in_output_is_blocked(tier, mesh, upstream, tools):
    """An output holding tenant B's canary marker is withheld from tenant A and recorded."""
    from services.orchestrator.canary import marker_for

    a, b = await mesh.tenant(tier), await mesh.tenant(tier)
    await mesh.stub.CreateTeam(
        pb.CreateTeamRequest(team=team_pb(tool_host=tools.host, model=MODEL)), metadata=a.metadata
    )
    leak = marker_for(b.tenant_id, bytes.fromhex("ab" * 32))
    upstream.script(Reply.text(f"B's data: {leak}"))
    run = (await mesh.stub.StartRun(pb.StartRunRequest(team="support", input="hi"), metadata=a.metadata)).run
    seen = await watch(mesh, a, run.run_id)
    assert [m.step.kind for m in seen][-2:] == [pb.STEP_KIND_OUTPUT_BLOCKED, pb.STEP_KIND_RUN_FINISHED]
    assert seen[-1].run.status == pb.RUN_STATUS_FAILED and seen[-1].run.error_reason == "OUTPUT_BLOCKED"
    assert leak not in str(seen) and seen[-1].run.output == ""


async def test_tenant_at_its_limit_queues_while_another_proceeds(tier, mesh, upstream):
    """A (limit 1) starts three runs, the first stuck on a slow model call; B's run finishes meanwhile."""
    a, b = await mesh.tenant(tier), await mesh.tenant(tier)
    for t in (a, b):
        await mesh.stub.CreateTeam(pb.CreateTeamRequest(team=team_pb(model=MODEL)), metadata=t.metadata)
    upstream.fail_next(Fault.slow(2.0))  # A's first model call; unscripted replies echo and end the run
    a_runs = []
    for i in range(3):
        a_runs.append(
            (
                await mesh.stub.StartRun(pb.StartRunRequest(team="support", input=f"a{i}"), metadata=a.metadata)
            ).run.run_id
        )
        if i == 0:
            while upstream.request_count < 1:
                await asyncio.sleep(0.02)
    b_run = (await mesh.stub.StartRun(pb.StartRunRequest(team="support", input="b0"), metadata=b.metadata)).run
    b_done = await watch(mesh, b, b_run.run_id)
    assert b_done[-1].run.status == pb.RUN_STATUS_SUCCEEDED
    statuses = [(await mesh.stub.GetRun(pb.GetRunRequest(run_id=r), metadata=a.metadata)).run.status for r in a_runs]
    assert statuses == [pb.RUN_STATUS_RUNNING, pb.RUN_STATUS_QUEUED, pb.RUN_STATUS_QUEUED]
    finished = [(await watch(mesh, a, r))[-1].run for r in a_runs]
    assert all(r.status == pb.RUN_STATUS_SUCCEEDED for r in finished)
    # A's runs started in the order they were queued, one at a time.
    starts = [r.update_time.ToNanoseconds() for r in finished]
    assert starts == sorted(starts)


async def test_cancel_running_run_stops_before_next_step(tier, mesh, upstream):
    """Cancelling mid-call lets the call finish, then the run stops CANCELLED without another step."""
    a = await mesh.tenant(tier)
    await mesh.stub.CreateTeam(pb.CreateTeamRequest(team=team_pb(model=MODEL)), metadata=a.metadata)
    upstream.fail_next(Fault.slow(1.0))
    upstream.script(Reply.tool_use("handoff", {"agent": "billing", "note": "n"}))
    run = (await mesh.stub.StartRun(pb.StartRunRequest(team="support", input="x"), metadata=a.metadata)).run
    while upstream.request_count < 1:
        await asyncio.sleep(0.02)
    cancelled = (await mesh.stub.CancelRun(pb.CancelRunRequest(run_id=run.run_id), metadata=a.metadata)).run
    assert cancelled.status == pb.RUN_STATUS_RUNNING
    seen = await watch(mesh, a, run.run_id)
    assert seen[-1].run.status == pb.RUN_STATUS_CANCELLED
    assert pb.STEP_KIND_HANDOFF not in [m.step.kind for m in seen] and upstream.request_count == 1


async def test_a_run_executing_here_streams_from_its_first_step_to_its_tenant_only(tier, mesh, upstream):
    """A run started on a free slot executes at once; its watchers here follow it from step 1 without the
    database, while another tenant watching it gets NOT_FOUND as for a run that does not exist."""
    a, b = await mesh.tenant(tier), await mesh.tenant(tier)
    await mesh.stub.CreateTeam(pb.CreateTeamRequest(team=team_pb(model=MODEL)), metadata=a.metadata)
    upstream.fail_next(Fault.slow(1.0))
    started = await mesh.stub.StartRun(pb.StartRunRequest(team="support", input="x"), metadata=a.metadata)
    assert started.run.status == pb.RUN_STATUS_RUNNING and not started.HasField("queue")
    run_id = started.run.run_id
    while upstream.request_count < 1:  # executing here, mid-call
        await asyncio.sleep(0.02)
    assert mesh.orchestrator.dispatcher.executing(run_id)
    for who, rid in ((b, run_id), (b, "r_" + "0" * 24)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await watch(mesh, who, rid)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    seen = await watch_whole_run(mesh, a, run_id)
    assert seen[-1].run.step_count == len(seen)


async def test_a_run_queued_here_streams_from_its_first_step_to_its_tenant_only(tier, mesh, upstream):
    """A fresh run that a StartRun here queued (its tenant's one slot taken): its tenant's stream waits for it
    without reading the database and follows it from step 1 once it starts here, while another tenant watching
    it, still queued, gets NOT_FOUND as for a run that does not exist."""
    a, b = await mesh.tenant(tier), await mesh.tenant(tier)
    await mesh.stub.CreateTeam(pb.CreateTeamRequest(team=team_pb(model=MODEL)), metadata=a.metadata)
    upstream.fail_next(Fault.slow(1.0))
    first = await mesh.stub.StartRun(pb.StartRunRequest(team="support", input="x"), metadata=a.metadata)
    while upstream.request_count < 1:  # the first run holds the slot, mid-call
        await asyncio.sleep(0.02)
    queued = await mesh.stub.StartRun(pb.StartRunRequest(team="support", input="y"), metadata=a.metadata)
    assert queued.run.status == pb.RUN_STATUS_QUEUED
    assert (queued.queue.position, queued.queue.running, queued.queue.limit) == (1, 1, 1)
    run_id = queued.run.run_id
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await watch(mesh, b, run_id)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    seen = await watch_whole_run(mesh, a, run_id)
    assert seen[-1].run.step_count == len(seen) and seen[-1].run.input == "y"
    assert (await watch(mesh, a, first.run.run_id))[-1].run.status == pb.RUN_STATUS_SUCCEEDED


async def test_cli_apply_start_list_and_cancel(tier, mesh, upstream, tmp_path, monkeypatch, capsys):
    """`bulkhead teams apply -f`, `runs start` (live progress), `runs list`, `runs cancel` against the mesh."""
    from bulkhead_cli import main

    a = await mesh.tenant(tier)
    for key, value in mesh.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("BULKHEAD_ORCHESTRATOR_ADDR", mesh.orchestrator.address)
    monkeypatch.setenv("BULKHEAD_API_KEY", a.api_key)
    team_file = tmp_path / "team.yaml"
    team_file.write_text(f"name: desk\nagents:\n  - name: solo\n    model: {MODEL}\n    system_prompt: Be brief.\n")
    assert await asyncio.to_thread(main, ["teams", "apply", "-f", str(team_file)]) == 0
    assert await asyncio.to_thread(main, ["teams", "apply", "-f", str(team_file)]) == 0
    upstream.script(Reply.text("All done."))
    assert await asyncio.to_thread(main, ["runs", "start", "desk", "hello there"]) == 0
    out = capsys.readouterr().out
    assert "team desk created" in out and "team desk updated" in out
    assert "run_started" in out and "model_call" in out and "succeeded" in out and "All done." in out
    assert await asyncio.to_thread(main, ["runs", "list", "--team", "desk"]) == 0
    assert "succeeded" in capsys.readouterr().out
    upstream.fail_next(Fault.slow(1.0))
    assert await asyncio.to_thread(main, ["runs", "start", "desk", "again", "--detach"]) == 0
    run_id = capsys.readouterr().out.split()[1]
    assert await asyncio.to_thread(main, ["runs", "cancel", run_id]) == 0
    assert run_id in capsys.readouterr().out
    # Let the run end before the next test: its slow call, if it made one, would take the reply that test
    # scripts. Cancelled while queued it ends CANCELLED; cancelled during its only model call, it has no
    # step left to stop before and ends SUCCEEDED.
    await watch(mesh, a, run_id)
    run = (await mesh.stub.GetRun(pb.GetRunRequest(run_id=run_id), metadata=a.metadata)).run
    assert run.status in (pb.RUN_STATUS_CANCELLED, pb.RUN_STATUS_SUCCEEDED)

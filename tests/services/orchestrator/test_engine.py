"""The agent loop against in-memory ports: steps, hand-offs, tools, limits, resume, canaries."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from services.orchestrator.canary import marker_for
from services.orchestrator.engine import Engine, Limits, Ports, RunJob, TenantSuspended
from services.orchestrator.history import replay
from services.orchestrator.http_tools import HttpToolRunner
from services.orchestrator.ports import TENANT_SUSPENDED, StepConflict
from services.orchestrator.ratelimit import RateLimiter
from services.orchestrator.steps import Step, StepKind
from services.orchestrator.team import AgentSpec, HttpToolSpec, TeamSpec
from shared.errors import Unavailable

from .fakes import DictSecrets, MemoryContext, MemoryStepLog, ScriptedModel, ToolServer, text, tool_use

KEY = b"c" * 32
SECRET = "sk-live-4f9c2a7b1e"


@pytest.fixture
def tool_server():
    server = ToolServer(body='{"invoice": "paid", "echo": "' + SECRET + '"}')
    yield server
    server.close()


def support_team(host: str) -> TeamSpec:
    return TeamSpec(
        name="support",
        agents=(
            AgentSpec("triage", system_prompt="Route the request.", handoffs=("billing",)),
            AgentSpec("billing", system_prompt="Answer billing questions.", tools=("invoices", "write_context")),
        ),
        http_tools=(
            HttpToolSpec(
                "invoices", f"http://{host}/invoices", headers={"authorization": "Bearer ${secret:billing_key}"}
            ),
        ),
        allowed_hosts=(host,),
    )


def ports(model, log=None, ctx=None, secrets=None, limiter=None) -> Ports:
    return Ports(
        log=log or MemoryStepLog(),
        model=model,
        context=ctx or MemoryContext(),
        secrets=secrets or DictSecrets({"billing_key": SECRET}),
        http=HttpToolRunner(client=httpx.AsyncClient(timeout=5), limiter=limiter or RateLimiter(100, 100)),
    )


def job(team: TeamSpec, tenant: str = "t_a") -> RunJob:
    return RunJob(run_id="r_1", tenant_id=tenant, team=team, entry_agent="triage", run_input="Is invoice 7 paid?")


def script() -> list:
    return [
        tool_use("handoff", {"agent": "billing", "note": "invoice question"}),
        tool_use("invoices", {"id": "7"}, use_id="tu_2"),
        text("Invoice 7 is paid."),
    ]


async def test_two_agent_run_with_handoff_and_http_tool(tool_server, caplog):
    """triage hands off to billing, billing calls the HTTP tool with the injected secret and answers."""
    caplog.set_level(logging.DEBUG)
    model, p = ScriptedModel(script()), None
    p = ports(model)
    view = await Engine(canary_key=KEY).execute(job(support_team(tool_server.host)), p)
    kinds = [s.kind for s in p.log.runs["r_1"]]
    assert kinds == [
        StepKind.RUN_STARTED,
        StepKind.MODEL_CALL,
        StepKind.HANDOFF,
        StepKind.MODEL_CALL,
        StepKind.TOOL_CALL,
        StepKind.MODEL_CALL,
        StepKind.RUN_FINISHED,
    ]
    assert view.finished.status == "succeeded" and view.finished.output == "Invoice 7 is paid."
    # The tool got the secret; the model, the log and the logs never did.
    assert tool_server.requests[0]["headers"]["authorization"] == f"Bearer {SECRET}"
    assert tool_server.requests[0]["path"] == "/invoices?id=7"
    assert SECRET not in json.dumps(model.calls)
    assert SECRET not in "".join(s.to_json().decode() for s in p.log.runs["r_1"])
    assert SECRET not in caplog.text
    # The prompt names the tenant and carries its marker; billing starts from the hand-off note.
    assert "t_a" in model.calls[0]["system"] and marker_for("t_a", KEY) in model.calls[0]["system"]
    assert "invoice question" in model.calls[1]["messages"][0]["content"]
    assert p.context.values[("run:r_1", "handoff")]
    # Every model call carries a distinct, step-derived idempotency key.
    assert [c["request_id"] for c in model.calls] == ["r_1-s2", "r_1-s4", "r_1-s6"]


async def test_resume_after_crash_repeats_no_completed_step(tool_server):
    """A second execution over a partial log continues where it ended: no model or tool call repeats."""
    team = support_team(tool_server.host)
    log = MemoryStepLog()
    first = ScriptedModel(script()[:2])

    class Crash(Exception):
        pass

    async def crash_after_tool(step: Step, view) -> None:
        if step.kind == StepKind.TOOL_CALL:
            raise Crash()

    with pytest.raises(Crash):
        await Engine(canary_key=KEY).execute(job(team), ports(first, log=log), on_step=crash_after_tool)
    assert len(first.calls) == 2 and len(tool_server.requests) == 1
    second = ScriptedModel(script()[2:])
    view = await Engine(canary_key=KEY).execute(job(team), ports(second, log=log))
    assert len(second.calls) == 1 and len(tool_server.requests) == 1
    assert second.calls[0]["request_id"] == "r_1-s6"
    assert view.finished.output == "Invoice 7 is paid."
    # The resumed context is exactly what an uninterrupted run would have sent.
    assert second.calls[0]["messages"][-1]["content"][0]["tool_use_id"] == "tu_2"


class _Stopped(Exception):
    """The execution dies (a kill, a suspension) right after the step that settled the run's end."""


@pytest.mark.parametrize(
    ("reply", "status", "reason"),
    [
        (text("Invoice 7 is paid."), "succeeded", ""),
        (text(f"leaked {marker_for('t_b', KEY)}"), "failed", "OUTPUT_BLOCKED"),
    ],
    ids=["final-answer", "output-blocked"],
)
async def test_resume_after_the_deciding_step_ends_the_run_without_asking_again(tool_server, reply, status, reason):
    """A stop between a final answer (or a withheld output) and its RUN_FINISHED: the next execution records
    that end; it does not call the model again (that call would be billed and could change the answer)."""
    log = MemoryStepLog()

    async def stop_after_model(step: Step, view) -> None:
        if step.kind in (StepKind.MODEL_CALL, StepKind.OUTPUT_BLOCKED):
            raise _Stopped()

    with pytest.raises(_Stopped):
        await Engine(canary_key=KEY).execute(
            job(support_team(tool_server.host)), ports(ScriptedModel([reply]), log=log), on_step=stop_after_model
        )
    assert log.runs["r_1"][-1].kind != StepKind.RUN_FINISHED

    again = ScriptedModel([])
    view = await Engine(canary_key=KEY).execute(job(support_team(tool_server.host)), ports(again, log=log))
    assert again.calls == []
    assert (view.finished.status, view.finished.reason) == (status, reason)
    assert view.finished.output == ("Invoice 7 is paid." if status == "succeeded" else "")
    assert [s.kind for s in log.runs["r_1"]].count(StepKind.RUN_FINISHED) == 1


class _Suspended(Exception):
    reason = TENANT_SUSPENDED


@pytest.mark.parametrize(
    ("refusal", "stops_with"),
    [(_Suspended(), TenantSuspended), (Unavailable("credentials did not answer"), Unavailable)],
    ids=["tenant-suspended", "credentials-unavailable"],
)
async def test_a_secret_not_fetchable_now_pauses_the_run_before_the_tool_step(tool_server, refusal, stops_with):
    """Credentials refusing the run's token (tenant suspended) or not answering is not the tool's failure: no
    TOOL_CALL step is recorded (the model never sees a made-up error), the run stops for the dispatcher to
    give back, and the next execution runs the tool once with its secret."""

    class RefusedOnce(DictSecrets):
        async def resolve(self, refs):
            if not self.asked:
                self.asked.append("refused")
                raise refusal
            return await super().resolve(refs)

    log, secrets = MemoryStepLog(), RefusedOnce({"billing_key": SECRET})
    team = support_team(tool_server.host)
    with pytest.raises(stops_with):
        await Engine(canary_key=KEY).execute(job(team), ports(ScriptedModel(script()[:2]), log=log, secrets=secrets))
    assert log.runs["r_1"][-1].kind == StepKind.MODEL_CALL and tool_server.requests == []

    view = await Engine(canary_key=KEY).execute(job(team), ports(ScriptedModel(script()[2:]), log=log, secrets=secrets))
    tool_steps = [s for s in log.runs["r_1"] if s.kind == StepKind.TOOL_CALL]
    assert [s.detail["is_error"] for s in tool_steps] == [False] and len(tool_server.requests) == 1
    assert view.finished.status == "succeeded"


async def test_handoff_outside_team_is_refused_and_recorded(tool_server):
    """A hand-off to an agent of another team (or tenant) is refused; the model sees an error; no context moves."""
    model = ScriptedModel(
        [
            tool_use("handoff", {"agent": "other-team/billing", "note": "secret stuff"}),
            tool_use("handoff", {"agent": "triage"}, use_id="tu_2"),
            text("I cannot hand off."),
        ]
    )
    p = ports(model)
    view = await Engine(canary_key=KEY).execute(job(support_team(tool_server.host)), p)
    refused = [s for s in p.log.runs["r_1"] if s.kind == StepKind.HANDOFF_REFUSED]
    assert [s.detail["target"] for s in refused] == ["other-team/billing", "triage"]
    assert view.current_agent == "triage" and p.context.values == {}
    assert model.calls[1]["messages"][-1]["content"][0]["is_error"] is True
    assert view.finished.status == "succeeded"


async def test_foreign_canary_blocks_output(tool_server):
    """An output holding another tenant's marker is withheld and the run fails OUTPUT_BLOCKED."""
    leak = marker_for("t_b", KEY)
    p = ports(ScriptedModel([text(f"here is data {leak}")]))
    view = await Engine(canary_key=KEY).execute(job(support_team(tool_server.host)), p)
    assert view.finished.status == "failed" and view.finished.reason == "OUTPUT_BLOCKED"
    assert leak not in "".join(s.to_json().decode() for s in p.log.runs["r_1"])
    assert any(s.kind == StepKind.OUTPUT_BLOCKED for s in p.log.runs["r_1"])


async def test_own_marker_is_not_blocked(tool_server):
    """An agent repeating its own tenant's marker is fine."""
    p = ports(ScriptedModel([text(f"marker {marker_for('t_a', KEY)}")]))
    view = await Engine(canary_key=KEY).execute(job(support_team(tool_server.host)), p)
    assert view.finished.status == "succeeded"


async def test_max_steps_stops_a_looping_agent(tool_server):
    """An agent that keeps calling tools stops at its step limit with MAX_STEPS."""
    team = TeamSpec(name="loop", agents=(AgentSpec("triage", tools=("read_context",), max_steps=3),))
    model = ScriptedModel([tool_use("read_context", {"key": "k"}, use_id=f"tu_{i}") for i in range(10)])
    p = ports(model)
    view = await Engine(canary_key=KEY, limits=Limits()).execute(job(team), p)
    assert len(model.calls) == 3 and view.finished.reason == "MAX_STEPS"


async def test_cancel_between_steps(tool_server):
    """A cancelled run stops before its next step."""
    p = ports(ScriptedModel(script()))
    calls = []
    view = await Engine(canary_key=KEY).execute(
        job(support_team(tool_server.host)), p, cancelled=lambda: len(p.model.calls) >= 1
    )
    assert view.finished.status == "cancelled" and len(p.model.calls) == 1 and calls == []


async def test_lost_lease_surfaces_as_step_conflict(tool_server):
    """When another executor appended first, this one stops with StepConflict instead of writing."""
    log = MemoryStepLog()
    await log.append("r_1", Step(1, StepKind.RUN_STARTED, "triage", detail={"input": "x", "entry_agent": "triage"}))

    class Racing(MemoryStepLog):
        async def append(self, run_id, step):
            await log.append(run_id, Step(step.index, StepKind.TOOL_CALL, "other"))  # the other replica wins
            await log.append(run_id, step)

        async def read(self, run_id, after=0):
            return await log.read(run_id, after)

    with pytest.raises(StepConflict):
        await Engine(canary_key=KEY).execute(
            job(support_team(tool_server.host)), ports(ScriptedModel(script()), log=Racing())
        )


async def test_unlisted_tool_is_an_error_result(tool_server):
    """A tool the agent does not list is not run, even if the team defines it."""
    model = ScriptedModel([tool_use("invoices", {"id": "1"}), text("ok")])
    view = await Engine(canary_key=KEY).execute(job(support_team(tool_server.host)), ports(model))
    assert tool_server.requests == [] and view.finished.status == "succeeded"
    assert model.calls[1]["messages"][-1]["content"][0]["is_error"] is True


def test_replay_rejects_gaps():
    """A log with a missing step cannot be replayed silently."""
    with pytest.raises(ValueError):
        replay([Step(1, StepKind.RUN_STARTED, "a"), Step(3, StepKind.RUN_FINISHED, "a")])

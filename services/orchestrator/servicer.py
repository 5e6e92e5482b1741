"""gRPC handlers of the orchestrator: proto in, Orchestrator call, proto out. Nothing else lives here."""

from __future__ import annotations

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from bulkhead.orchestrator.v1 import orchestrator_pb2 as pb
from bulkhead.orchestrator.v1 import orchestrator_pb2_grpc
from services.orchestrator.operations import Orchestrator, RunQueue
from services.orchestrator.runs import RunStatus
from services.orchestrator.stats import RunStats
from services.orchestrator.steps import Step, StepKind
from services.orchestrator.store import RunRecord, TeamRecord
from services.orchestrator.team import AgentSpec, HttpToolSpec, TeamSpec
from shared.config_audit import ConfigAudit

_STATUS_TO_PB = {s: getattr(pb, f"RUN_STATUS_{s.name}") for s in RunStatus}
_STATUS_FROM_PB = {v: k for k, v in _STATUS_TO_PB.items()}
_KIND_TO_PB = {k: getattr(pb, f"STEP_KIND_{k.name}") for k in StepKind}
_TEAMS = {"orch_teams"}


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    """Thin translation between bulkhead.orchestrator.v1 messages and Orchestrator."""

    def __init__(self, orchestrator: Orchestrator, stats: RunStats, *, audit: ConfigAudit):
        self._o, self._stats, self._audit = orchestrator, stats, audit

    async def CreateTeam(self, request, context):
        async with self._audit.change_own(
            "team.create", target=f"team/{request.team.name}", tables=_TEAMS, detail=_team_detail(request.team)
        ):
            record = await self._o.create_team(team_from_pb(request.team))
        return pb.CreateTeamResponse(team=team_to_pb(record))

    async def GetTeam(self, request, context):
        return pb.GetTeamResponse(team=team_to_pb(await self._o.get_team(request.name)))

    async def ListTeams(self, request, context):
        page = await self._o.list_teams(request.page_size, request.page_token)
        return pb.ListTeamsResponse(teams=[team_to_pb(t) for t in page.items], next_page_token=page.next_page_token)

    async def UpdateTeam(self, request, context):
        async with self._audit.change_own(
            "team.update",
            target=f"team/{request.team.name}",
            tables=_TEAMS,
            detail={**_team_detail(request.team), "update_mask": list(request.update_mask.paths)},
        ):
            record = await self._o.update_team(
                team_from_pb(request.team), request.team.etag, list(request.update_mask.paths)
            )
        return pb.UpdateTeamResponse(team=team_to_pb(record))

    async def DeleteTeam(self, request, context):
        async with self._audit.change_own("team.delete", target=f"team/{request.name}", tables=_TEAMS):
            await self._o.delete_team(request.name)
        return pb.DeleteTeamResponse()

    async def StartRun(self, request, context):
        run, queue = await self._o.start_run_placed(
            team=request.team,
            entry_agent=request.entry_agent,
            run_input=request.input,
            idempotency_key=request.idempotency_key,
        )
        return pb.StartRunResponse(run=run_to_pb(run), queue=queue_to_pb(queue))

    async def GetRun(self, request, context):
        run = await self._o.get_run(request.run_id)
        return pb.GetRunResponse(run=run_to_pb(run), queue=queue_to_pb(await self._o.queue_of(run)))

    async def ListRuns(self, request, context):
        page = await self._o.list_runs(
            page_size=request.page_size,
            page_token=request.page_token,
            status=_STATUS_FROM_PB.get(request.status),
            team=request.team,
        )
        return pb.ListRunsResponse(runs=[run_to_pb(r) for r in page.items], next_page_token=page.next_page_token)

    async def WatchRun(self, request, context):
        async for step, run in self._o.watch(request.run_id, request.after_step):
            yield pb.WatchRunResponse(step=step_to_pb(run.run_id, step), run=run_to_pb(run))

    async def CancelRun(self, request, context):
        return pb.CancelRunResponse(run=run_to_pb(await self._o.cancel_run(request.run_id)))

    async def GetRunStats(self, request, context):
        start = _seconds(request.start_time) if request.HasField("start_time") else None
        end = _seconds(request.end_time) if request.HasField("end_time") else None
        agents = await self._stats.per_agent(start, end)
        return pb.GetRunStatsResponse(
            agents=[
                pb.AgentRunStats(
                    agent=a.agent,
                    succeeded=a.succeeded,
                    failed=a.failed,
                    cancelled=a.cancelled,
                    queued=a.queued,
                    running=a.running,
                    running_now=a.running_now,
                    queued_now=a.queued_now,
                    latency_steps=a.latency_steps,
                    step_latency_p50_ms=a.p50_ms,
                    step_latency_p95_ms=a.p95_ms,
                )
                for a in agents
            ]
        )


def _team_detail(t: pb.Team) -> dict[str, object]:
    # Names and models only: prompts are content and tool headers may carry credentials.
    return {
        "agents": [a.name for a in t.agents],
        "models": sorted({a.model for a in t.agents if a.model}),
        "tools": [h.name for h in t.http_tools],
        "allowed_hosts": list(t.allowed_hosts),
    }


def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _seconds(ts: timestamp_pb2.Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def _struct(d: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


def team_from_pb(t: pb.Team) -> TeamSpec:
    """A proto team as a TeamSpec (output-only fields dropped)."""
    return TeamSpec(
        name=t.name,
        description=t.description,
        agents=tuple(
            AgentSpec(
                name=a.name,
                system_prompt=a.system_prompt,
                model=a.model,
                tools=tuple(a.tools),
                handoffs=tuple(a.handoffs),
                max_steps=a.max_steps,
                max_tokens=a.max_tokens,
            )
            for a in t.agents
        ),
        http_tools=tuple(
            HttpToolSpec(
                name=h.name,
                url=h.url,
                method=(h.method or "GET").upper(),
                description=h.description,
                headers=dict(h.headers),
                input_schema=json_format.MessageToDict(h.input_schema),
            )
            for h in t.http_tools
        ),
        allowed_hosts=tuple(t.allowed_hosts),
    )


def team_to_pb(r: TeamRecord) -> pb.Team:
    """A stored team as proto."""
    s = r.spec
    return pb.Team(
        name=s.name,
        description=s.description,
        agents=[
            pb.Agent(
                name=a.name,
                system_prompt=a.system_prompt,
                model=a.model,
                tools=a.tools,
                handoffs=a.handoffs,
                max_steps=a.max_steps,
                max_tokens=a.max_tokens,
            )
            for a in s.agents
        ],
        http_tools=[
            pb.HttpTool(
                name=h.name,
                description=h.description,
                method=h.method,
                url=h.url,
                headers=dict(h.headers),
                input_schema=_struct(dict(h.input_schema)),
            )
            for h in s.http_tools
        ],
        allowed_hosts=s.allowed_hosts,
        etag=r.etag,
        create_time=_ts(r.created_at),
        update_time=_ts(r.updated_at),
    )


def run_to_pb(r: RunRecord) -> pb.Run:
    """A stored run as proto."""
    return pb.Run(
        run_id=r.run_id,
        team=r.team,
        entry_agent=r.entry_agent,
        input=r.input,
        status=_STATUS_TO_PB[r.status],
        current_agent=r.current_agent,
        output=r.output,
        step_count=r.step_count,
        error_reason=r.error_reason,
        error_message=r.error_message,
        idempotency_key=r.idempotency_key,
        create_time=_ts(r.created_at),
        update_time=_ts(r.updated_at),
        trace_id=r.trace_id,
    )


def queue_to_pb(q: RunQueue | None) -> pb.RunQueue | None:
    """Where a queued run waits, as proto (None leaves the field unset)."""
    return pb.RunQueue(position=q.position, running=q.running, limit=q.limit) if q else None


def step_to_pb(run_id: str, s: Step) -> pb.Step:
    """A step as proto."""
    return pb.Step(
        run_id=run_id,
        index=s.index,
        kind=_KIND_TO_PB[s.kind],
        agent=s.agent,
        summary=s.summary,
        detail=_struct(s.detail),
        create_time=_ts(s.created_at),
    )

"""The agent loop: one run, step by step, each step appended to the log before the next begins.

The engine holds no progress of its own: it replays the log, does the one next thing (a model
call, a tool call, a hand-off) and appends it. Killed at any point, the next execution replays
the same log and continues; a step that was appended is never repeated, and a step that was
not gets the same idempotency key when it is retried, so the proxy and metering count it once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace

from services.orchestrator.canary import fingerprint, foreign_markers, marker_for
from services.orchestrator.history import RunView, replay
from services.orchestrator.http_tools import HttpToolRunner
from services.orchestrator.ports import (
    ContextStore,
    ModelClient,
    ModelReply,
    SecretSource,
    StepLog,
    suspended_refusal,
)
from services.orchestrator.runs import FailReason, RunStatus
from services.orchestrator.steps import Step, StepKind, step_request_id
from services.orchestrator.team import HANDOFF_TOOL, AgentSpec, TeamSpec
from shared.errors import BulkheadError, ResourceExhausted, Unavailable

log = logging.getLogger("bulkhead.orchestrator.engine")
_tracer = trace.get_tracer("bulkhead.orchestrator")


class TenantSuspended(Exception):
    """The run's tenant was suspended: stop at this step boundary; the run resumes here after resume."""


@dataclass(frozen=True)
class Limits:
    """Step limits applied when an agent does not set its own."""

    max_steps_per_agent: int = 10
    """Model calls one agent may make in a run, unless the agent says otherwise."""
    max_steps_per_run: int = 40
    """Model calls all agents of a run may make together (the tenant's ceiling)."""
    max_tokens: int = 1024
    """max_tokens per model call, unless the agent says otherwise."""
    model_retries: int = 2
    """Retries of a model call that failed as UNAVAILABLE (same idempotency key)."""


@dataclass(frozen=True)
class RunJob:
    """What the engine needs to know about the run it executes."""

    run_id: str
    """The run."""
    tenant_id: str
    """Its tenant (names the tenant in prompts; the calls carry the tenant's token)."""
    team: TeamSpec
    """The team definition the run started with."""
    entry_agent: str
    """Who gets the input."""
    run_input: str
    """The user's input."""


OnStep = Callable[[Step, RunView], Awaitable[None]]
OnLoad = Callable[[list[Step], RunView], Awaitable[None]]


@dataclass
class Ports:
    """The engine's dependencies, all bound to the current tenant by the caller."""

    log: StepLog
    """Where steps go."""
    model: ModelClient
    """The inference proxy."""
    context: ContextStore
    """Shared context of the run."""
    secrets: SecretSource
    """Secrets for tool injection."""
    http: HttpToolRunner
    """HTTP tools."""


class Engine:
    """Executes runs; safe to share across tenants because every dependency is per call."""

    def __init__(self, *, canary_key: bytes, limits: Limits = Limits()):
        self._canary_key, self._limits = canary_key, limits

    async def execute(
        self,
        job: RunJob,
        ports: Ports,
        *,
        fresh: bool = False,
        cancelled: Callable[[], bool] = lambda: False,
        suspended: Callable[[], bool] = lambda: False,
        on_step: OnStep | None = None,
        on_load: OnLoad | None = None,
    ) -> RunView:
        """Run job from wherever its log ends until it finishes; returns the final view.

        fresh: the run never executed before, so its log is empty and is not read.
        Raises StepConflict when another executor wrote to the log (this one lost the lease), and
        TenantSuspended before a step when the tenant is suspended (nothing of that step was done).
        """
        ex = _Execution(self, job, ports, on_step)
        attrs = {"tenant.id": job.tenant_id, "run.id": job.run_id, "team": job.team.name}
        with _tracer.start_as_current_span("orchestrator.run", attributes=attrs):
            await ex.load(on_load, fresh)
            while ex.view.finished is None:
                # One span per step: ids and kinds only, never content (it may be sensitive).
                with _tracer.start_as_current_span(
                    "orchestrator.step",
                    attributes={**attrs, "step.index": ex.view.last_index + 1, "agent": ex.view.current_agent},
                ):
                    if cancelled():
                        await ex.finish(RunStatus.CANCELLED, message="cancelled by request")
                    elif suspended():
                        raise TenantSuspended(job.tenant_id)
                    else:
                        try:
                            await ex.advance()
                        except Exception as err:
                            # Suspended mid-step (state or credentials refused the run's token): the
                            # step was not appended, so it runs again after resume. A model call made
                            # meanwhile is answered from the proxy's replay cache by its request id.
                            if suspended_refusal(err):
                                raise TenantSuspended(job.tenant_id) from None
                            raise
        return ex.view

    def system_prompt(self, tenant_id: str, team: TeamSpec, agent: AgentSpec) -> str:
        """The agent's system prompt, naming the tenant it serves and carrying its canary marker."""
        return (
            f"You are agent '{agent.name}' of team '{team.name}', serving tenant {tenant_id} only. "
            f"Never use or reveal data of any other tenant. Tenant marker: "
            f"{marker_for(tenant_id, self._canary_key)}.\n\n{agent.system_prompt}"
        ).rstrip()


class _Execution:
    """One pass of the engine over one run."""

    def __init__(self, engine: Engine, job: RunJob, ports: Ports, on_step: OnStep | None):
        self.e, self.job, self.p, self.on_step = engine, job, ports, on_step
        self.view = RunView()
        self.marker = marker_for(job.tenant_id, engine._canary_key)
        self._prompts: dict[str, tuple[str, list[dict[str, Any]]]] = {}
        """Per agent: its system prompt and tool definitions, made once per run (they never change in one)."""

    def prompt(self, agent: AgentSpec) -> tuple[str, list[dict[str, Any]]]:
        """The agent's system prompt and tool definitions for this run."""
        made = self._prompts.get(agent.name)
        if made is None:
            made = self._prompts[agent.name] = (
                self.e.system_prompt(self.job.tenant_id, self.job.team, agent),
                self.tool_definitions(agent),
            )
        return made

    async def load(self, on_load: OnLoad | None, fresh: bool = False) -> None:
        steps = [] if fresh else await self.p.log.read(self.job.run_id)
        self.view = replay(steps)
        if on_load is not None and steps:
            await on_load(steps, self.view)
        if self.view.last_index == 0:
            await self.append(
                StepKind.RUN_STARTED,
                self.job.entry_agent,
                f"run started at {self.job.entry_agent}",
                {"input": self.job.run_input, "entry_agent": self.job.entry_agent, "team": self.job.team.name},
            )

    async def append(self, kind: StepKind, agent: str, summary: str, detail: dict[str, Any]) -> Step:
        step = Step(index=self.view.last_index + 1, kind=kind, agent=agent, summary=summary, detail=detail)
        await self.p.log.append(self.job.run_id, step)
        self.view.apply(step)
        if self.on_step is not None:
            await self.on_step(step, self.view)
        return step

    async def finish(self, status: RunStatus, *, output: str = "", reason: str = "", message: str = "") -> None:
        detail = {"status": status.value, "output": output, "reason": reason, "message": message}
        await self.append(StepKind.RUN_FINISHED, self.view.current_agent, f"run {status.value}", detail)

    async def conclude(self) -> bool:
        """Record the end the last step settled (RunView.ending), if it settled one."""
        end = self.view.ending
        if end is None:
            return False
        await self.finish(RunStatus(end.status), output=end.output, reason=end.reason, message=end.message)
        return True

    async def advance(self) -> None:
        if await self.conclude():  # the last execution stopped right after the step that settled the end
            return
        agent = self.job.team.agent(self.view.current_agent)
        if agent is None:
            await self.finish(
                RunStatus.FAILED,
                reason=FailReason.AGENT_MISSING,
                message=f"agent {self.view.current_agent!r} is not in team {self.job.team.name!r}",
            )
        elif self.view.pending_tool_uses:
            await self.tool_step(agent, self.view.pending_tool_uses[0])
        else:
            await self.model_step(agent)

    # --- model calls -------------------------------------------------------------------------

    async def model_step(self, agent: AgentSpec) -> None:
        limits = self.e._limits
        agent_limit = agent.max_steps or limits.max_steps_per_agent
        if self.view.model_calls[agent.name] >= agent_limit or self.view.total_model_calls >= limits.max_steps_per_run:
            await self.finish(
                RunStatus.FAILED,
                reason=FailReason.MAX_STEPS,
                message=f"step limit reached ({agent.name}: {agent_limit} model calls)",
            )
            return
        request_id = step_request_id(self.job.run_id, self.view.last_index + 1)
        try:
            reply = await self.call_model(agent, request_id)
        except Unavailable:
            raise  # transient: the dispatcher gives the run back and it resumes at this very step
        except BulkheadError as err:
            if suspended_refusal(err):  # suspended mid-step: the proxy refused before any upstream call
                raise TenantSuspended(self.job.tenant_id) from None
            reason = err.reason if isinstance(err, ResourceExhausted) else FailReason.MODEL_ERROR
            await self.finish(RunStatus.FAILED, reason=reason, message=f"model call failed: {err.message}")
            return
        text = "".join(b.get("text", "") for b in reply.content if b.get("type") == "text")
        foreign = foreign_markers(
            text + json.dumps([b.get("input") for b in reply.content if b.get("type") == "tool_use"]), self.marker
        )
        if foreign:
            log.warning(
                "agent output blocked",
                extra={
                    "tenant_id": self.job.tenant_id,
                    "run_id": self.job.run_id,
                    "agent": agent.name,
                    "outcome": "output_blocked",
                },
            )
            await self.append(
                StepKind.OUTPUT_BLOCKED,
                agent.name,
                "output withheld: foreign canary marker",
                {"markers": [fingerprint(m) for m in foreign], "request_id": request_id},
            )
            await self.conclude()
            return
        uses = [b for b in reply.content if b.get("type") == "tool_use"]
        await self.append(
            StepKind.MODEL_CALL,
            agent.name,
            f"{agent.name}: {reply.stop_reason}" + (f" ({', '.join(u['name'] for u in uses)})" if uses else ""),
            {
                "content": reply.content,
                "stop_reason": reply.stop_reason,
                "model": reply.model,
                "usage": reply.usage,
                "request_id": request_id,
            },
        )
        await self.conclude()  # a final answer ends the run

    async def call_model(self, agent: AgentSpec, request_id: str) -> ModelReply:
        attempt = 0
        system, tools = self.prompt(agent)
        while True:
            try:
                return await self.p.model.create_message(
                    model=agent.model,
                    system=system,
                    messages=self.view.messages,
                    tools=tools,
                    max_tokens=agent.max_tokens or self.e._limits.max_tokens,
                    request_id=request_id,
                    agent=agent.name,
                    run_id=self.job.run_id,
                )
            except Unavailable:
                attempt += 1
                if attempt > self.e._limits.model_retries:
                    raise
                await asyncio.sleep(0.2 * 2**attempt)

    def tool_definitions(self, agent: AgentSpec) -> list[dict[str, Any]]:
        tools: list[dict[str, Any]] = []
        for name in agent.tools:
            if name == "read_context":
                tools.append(
                    {
                        "name": name,
                        "description": "Read a value from the run's shared context.",
                        "input_schema": {
                            "type": "object",
                            "properties": {"key": {"type": "string"}},
                            "required": ["key"],
                        },
                    }
                )
            elif name == "write_context":
                tools.append(
                    {
                        "name": name,
                        "description": "Write a value to the run's shared context.",
                        "input_schema": {
                            "type": "object",
                            "properties": {"key": {"type": "string"}, "value": {"type": "string"}},
                            "required": ["key", "value"],
                        },
                    }
                )
            elif (http := self.job.team.http_tool(name)) is not None:
                tools.append(
                    {
                        "name": http.name,
                        "description": http.description or http.name,
                        "input_schema": dict(http.input_schema) or {"type": "object"},
                    }
                )
        if agent.handoffs:
            tools.append(
                {
                    "name": HANDOFF_TOOL,
                    "description": "Hand the run to another agent of your team: " + ", ".join(agent.handoffs),
                    "input_schema": {
                        "type": "object",
                        "properties": {
                            "agent": {"type": "string", "enum": list(agent.handoffs)},
                            "note": {"type": "string"},
                        },
                        "required": ["agent"],
                    },
                }
            )
        return tools

    # --- tool calls --------------------------------------------------------------------------

    async def tool_step(self, agent: AgentSpec, use: dict[str, Any]) -> None:
        name, tool_input, use_id = use.get("name", ""), use.get("input") or {}, use.get("id", "")
        if name == HANDOFF_TOOL:
            await self.handoff(agent, use_id, tool_input)
            return
        result, is_error, status = await self.run_tool(agent, name, tool_input)
        await self.append(
            StepKind.TOOL_CALL,
            agent.name,
            f"{name}: {'error' if is_error else 'ok'}" + (f" (HTTP {status})" if status else ""),
            {
                "tool_use_id": use_id,
                "name": name,
                "input": tool_input,
                "result": result,
                "is_error": is_error,
                "status": status,
            },
        )

    async def run_tool(self, agent: AgentSpec, name: str, tool_input: dict[str, Any]) -> tuple[str, bool, int]:
        scope = f"run:{self.job.run_id}"
        if name not in agent.tools:
            return f"tool {name!r} is not available to agent {agent.name!r}", True, 0
        if name == "read_context":
            value = await self.p.context.get(scope, str(tool_input.get("key", "")))
            return (value if value is not None else "(no value)"), False, 0
        if name == "write_context":
            await self.p.context.put(scope, str(tool_input.get("key", "")), str(tool_input.get("value", "")))
            return "ok", False, 0
        http = self.job.team.http_tool(name)
        if http is None:
            return f"tool {name!r} is not defined by this team", True, 0
        res = await self.p.http.call(
            http,
            tool_input,
            allowed_hosts=self.job.team.allowed_hosts,
            secrets=self.p.secrets,
            tenant_id=self.job.tenant_id,
            run_id=self.job.run_id,
        )
        return res.text, res.is_error, res.status

    async def handoff(self, agent: AgentSpec, use_id: str, tool_input: dict[str, Any]) -> None:
        target = str(tool_input.get("agent", ""))
        note = str(tool_input.get("note", ""))[:4000]
        reason = self.refusal(agent, target)
        if reason:
            log.warning(
                "hand-off refused",
                extra={
                    "tenant_id": self.job.tenant_id,
                    "run_id": self.job.run_id,
                    "agent": agent.name,
                    "outcome": "handoff_refused",
                },
            )
            await self.append(
                StepKind.HANDOFF_REFUSED,
                agent.name,
                f"{agent.name} -> {target}: refused",
                {"tool_use_id": use_id, "source": agent.name, "target": target, "reason": reason},
            )
            return
        # The note travels through state (the run's context), never through this process's memory.
        await self.p.context.put(
            f"run:{self.job.run_id}", "handoff", json.dumps({"source": agent.name, "target": target, "note": note})
        )
        await self.append(
            StepKind.HANDOFF,
            agent.name,
            f"{agent.name} -> {target}",
            {"tool_use_id": use_id, "source": agent.name, "target": target, "note": note},
        )

    def refusal(self, agent: AgentSpec, target: str) -> str:
        """Why a hand-off from agent to target is refused, or '' when it is allowed."""
        if self.job.team.agent(target) is None:
            return f"{target!r} is not an agent of team {self.job.team.name!r} of this tenant"
        if target not in agent.handoffs:
            return f"agent {agent.name!r} may not hand off to {target!r}"
        return ""

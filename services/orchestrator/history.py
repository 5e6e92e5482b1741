"""Replay: rebuild where a run stands (agent, model context, pending tool calls) from its steps.

The engine never keeps a run's progress anywhere but the step log, so a restarted or different
replica continues exactly where the log ends, and a completed step is never done twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from services.orchestrator.runs import FailReason, RunStatus
from services.orchestrator.steps import Step, StepKind

OUTPUT_BLOCKED_MESSAGE = "an agent output held another tenant's data and was withheld"


def handoff_message(run_input: str, source: str, note: str) -> str:
    """The first user message an agent sees after a hand-off."""
    return f"{run_input}\n\n[Handed off to you by agent {source!r}. Note: {note}]"


@dataclass
class Finished:
    """How a run ended."""

    status: str
    """succeeded, failed or cancelled."""
    output: str = ""
    """The answer of a successful run."""
    reason: str = ""
    """Why it failed, machine-readable."""
    message: str = ""
    """Why it failed, for people."""


@dataclass
class RunView:
    """The state of a run as its steps say it is."""

    run_input: str = ""
    """What the user asked."""
    current_agent: str = ""
    """The agent in charge."""
    messages: list[dict[str, Any]] = field(default_factory=list)
    """The current agent's model context (Messages API shape)."""
    pending_tool_uses: list[dict[str, Any]] = field(default_factory=list)
    """tool_use blocks of the last model call that have no result yet."""
    model_calls: Counter[str] = field(default_factory=Counter)
    """Model calls made so far, per agent."""
    last_index: int = 0
    """Index of the last step (the log's version)."""
    last_text: str = ""
    """Text of the last model reply."""
    finished: Finished | None = None
    """Set once the run has ended."""
    ending: Finished | None = None
    """The end the last step settled (a final answer, a withheld output) while its RUN_FINISHED is not in the
    log: an execution stopped between the two (killed, suspended) is finished with it, not asked again."""
    _results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total_model_calls(self) -> int:
        """Model calls made by all agents of the run."""
        return sum(self.model_calls.values())

    def apply(self, step: Step) -> None:
        """Advance the view by one step (steps must come in index order)."""
        if step.index != self.last_index + 1:
            raise ValueError(f"step {step.index} does not follow {self.last_index}")
        self.last_index = step.index
        self.ending = None
        d = step.detail
        match step.kind:
            case StepKind.RUN_STARTED:
                self.run_input = d.get("input", "")
                self.current_agent = d.get("entry_agent", step.agent)
                self.messages = [{"role": "user", "content": self.run_input}]
            case StepKind.MODEL_CALL:
                content = d.get("content") or []
                self.model_calls[step.agent] += 1
                self.messages.append({"role": "assistant", "content": content})
                self.last_text = "".join(b.get("text", "") for b in content if b.get("type") == "text")
                self.pending_tool_uses = [b for b in content if b.get("type") == "tool_use"]
                self._results = []
                if not self.pending_tool_uses:
                    self.ending = Finished(status=RunStatus.SUCCEEDED, output=self.last_text)
            case StepKind.TOOL_CALL:
                self._answer(d.get("tool_use_id", ""), d.get("result", ""), bool(d.get("is_error")))
            case StepKind.HANDOFF_REFUSED:
                self._answer(d.get("tool_use_id", ""), f"hand-off refused: {d.get('reason', '')}", True)
            case StepKind.HANDOFF:
                self.current_agent = d["target"]
                self.messages = [
                    {"role": "user", "content": handoff_message(self.run_input, d.get("source", ""), d.get("note", ""))}
                ]
                self.pending_tool_uses, self._results = [], []
            case StepKind.OUTPUT_BLOCKED:
                self.ending = Finished(
                    status=RunStatus.FAILED, reason=FailReason.OUTPUT_BLOCKED, message=OUTPUT_BLOCKED_MESSAGE
                )
            case StepKind.RUN_FINISHED:
                self.finished = Finished(
                    status=d.get("status", ""),
                    output=d.get("output", ""),
                    reason=d.get("reason", ""),
                    message=d.get("message", ""),
                )

    def _answer(self, tool_use_id: str, result: str, is_error: bool) -> None:
        self.pending_tool_uses = [t for t in self.pending_tool_uses if t.get("id") != tool_use_id]
        block: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_use_id, "content": result}
        if is_error:
            block["is_error"] = True
        self._results.append(block)
        if not self.pending_tool_uses:
            self.messages.append({"role": "user", "content": self._results})
            self._results = []


def replay(steps: Iterable[Step]) -> RunView:
    """The view after applying every step in order."""
    view = RunView()
    for step in steps:
        view.apply(step)
    return view

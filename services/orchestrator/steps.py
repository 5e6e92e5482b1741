"""Steps: the durable entries of a run's history, as appended to the state service."""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass, field
from typing import Any


class StepKind(enum.StrEnum):
    """What happened in a step (mirrors the proto's StepKind)."""

    RUN_STARTED = "run_started"
    MODEL_CALL = "model_call"
    TOOL_CALL = "tool_call"
    HANDOFF = "handoff"
    HANDOFF_REFUSED = "handoff_refused"
    OUTPUT_BLOCKED = "output_blocked"
    RUN_FINISHED = "run_finished"


STEP_EVENT_TYPE = "orchestrator.step"
"""The event type steps carry in the state service's log."""


@dataclass(frozen=True)
class Step:
    """One entry of a run's history; `index` is its version in the run's event log (dense, from 1)."""

    index: int
    """Position in the run, from 1."""
    kind: StepKind
    """What happened."""
    agent: str
    """The agent that acted."""
    summary: str = ""
    """One line for people."""
    detail: dict[str, Any] = field(default_factory=dict)
    """Structured, JSON-safe detail (never a secret value)."""
    created_at: float = field(default_factory=time.time)
    """Unix time the step was recorded."""

    def to_json(self) -> bytes:
        """The event payload written to state."""
        return json.dumps(
            {
                "index": self.index,
                "kind": self.kind.value,
                "agent": self.agent,
                "summary": self.summary,
                "detail": self.detail,
                "created_at": self.created_at,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, payload: bytes | str) -> Step:
        """Parse an event payload written by to_json."""
        d = json.loads(payload)
        return cls(
            index=int(d["index"]),
            kind=StepKind(d["kind"]),
            agent=d.get("agent", ""),
            summary=d.get("summary", ""),
            detail=d.get("detail") or {},
            created_at=float(d.get("created_at") or 0.0),
        )


def step_request_id(run_id: str, index: int) -> str:
    """The idempotency key of a step's side effects (x-request-id to the proxy and metering)."""
    return f"{run_id}-s{index}"

"""The run life cycle: statuses and the transitions allowed between them. No grpc here."""

from __future__ import annotations

import enum


class RunStatus(enum.StrEnum):
    """Where a run is in its life (mirrors the proto's RunStatus)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """A finished run never changes again."""
        return self in _TERMINAL


_TERMINAL = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})

_ALLOWED: dict[RunStatus, frozenset[RunStatus]] = {
    # QUEUED -> FAILED: a run can fail before its first step (its delegated token refused or expired).
    RunStatus.QUEUED: frozenset({RunStatus.RUNNING, RunStatus.FAILED, RunStatus.CANCELLED}),
    # RUNNING -> QUEUED happens when a lease expires and the run waits for another replica.
    RunStatus.RUNNING: frozenset({RunStatus.QUEUED, RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED}),
    RunStatus.SUCCEEDED: frozenset(),
    RunStatus.FAILED: frozenset(),
    RunStatus.CANCELLED: frozenset(),
}


class InvalidTransition(ValueError):
    """A status change the life cycle does not allow (a bug or a lost race)."""


def check_transition(current: RunStatus, new: RunStatus) -> None:
    """Raise InvalidTransition unless a run may go from `current` to `new` (same status is allowed)."""
    if new != current and new not in _ALLOWED[current]:
        raise InvalidTransition(f"run cannot go from {current} to {new}")


class FailReason(enum.StrEnum):
    """Machine-readable reasons a run failed (Run.error_reason)."""

    MAX_STEPS = "MAX_STEPS"
    OUTPUT_BLOCKED = "OUTPUT_BLOCKED"
    MODEL_ERROR = "MODEL_ERROR"
    AGENT_MISSING = "AGENT_MISSING"
    INTERNAL = "INTERNAL"

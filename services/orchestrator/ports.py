"""What the engine needs from the rest of the mesh, as small protocols.

Production implementations call the state, inference and credentials services over gRPC
(services/orchestrator/peers.py); the engine only sees these shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.orchestrator.steps import Step

TENANT_SUSPENDED = "TENANT_SUSPENDED"
"""The reason a port's error carries when a service refused the run's token because its tenant was suspended
meanwhile: not a failure of the step, which the run does again after resume."""


def suspended_refusal(exc: BaseException) -> bool:
    """Whether exc is a service's refusal because the run's tenant is suspended."""
    return getattr(exc, "reason", None) == TENANT_SUSPENDED


class StepConflict(Exception):
    """Another writer appended to the run's log first (the lease was lost): stop executing."""


@dataclass(frozen=True)
class ModelReply:
    """What a model call returned, in Messages API shape."""

    content: list[dict[str, Any]]
    """Content blocks (text, tool_use)."""
    stop_reason: str
    """end_turn, tool_use, max_tokens, ..."""
    model: str = ""
    """The model version that served the call."""
    usage: dict[str, int] = field(default_factory=dict)
    """input_tokens / output_tokens."""


class StepLog(Protocol):
    """A run's append-only step log (the state service's event log of the run's thread)."""

    async def append(self, run_id: str, step: Step) -> None:
        """Append step at version step.index; raise StepConflict if the log is not at index-1."""

    async def read(self, run_id: str, after: int = 0) -> list[Step]:
        """Steps with index > after, in order."""


class ContextStore(Protocol):
    """The state service's shared key-value context."""

    async def get(self, scope: str, key: str) -> str | None:
        """The value, or None."""

    async def put(self, scope: str, key: str, value: str) -> None:
        """Set the value."""


class ModelClient(Protocol):
    """The inference proxy's CreateMessage."""

    async def create_message(
        self,
        *,
        model: str,
        system: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        max_tokens: int,
        request_id: str,
        agent: str,
        run_id: str,
    ) -> ModelReply:
        """One model call; request_id is its idempotency key."""


class SecretSource(Protocol):
    """Secret values for tool injection (injection.SecretInjector over the credentials service)."""

    async def resolve(self, refs: Mapping[str, str]) -> Mapping[str, str]:
        """The current values of the current tenant's secrets, by the key each was asked under; an error
        with reason TENANT_SUSPENDED when the credentials service refused the run's token, Unavailable when it
        did not answer."""

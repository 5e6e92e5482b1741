"""The orchestrator's peers: where they listen, and gRPC implementations of the engine's ports on them: state,
inference proxy, identity (secrets: the injection module).

Every call goes through a forwarding channel, so it carries the current TenantContext: the run's
delegated token, its tenant, and the step's request id (the idempotency key downstream). Every call runs in
errors.peer_call(): a peer's failure reaches the engine as our own error, its special cases caught by class.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from bulkhead.identity.v1 import identity_pb2, identity_pb2_grpc
from bulkhead.inference.v1 import inference_pb2, inference_pb2_grpc
from bulkhead.state.v1 import state_pb2, state_pb2_grpc
from services.orchestrator.ports import ModelReply, StepConflict
from services.orchestrator.steps import STEP_EVENT_TYPE, Step
from shared import errors
from shared.errors import peer_call
from shared.tenancy import require_tenant, tenant_scope

_STOP = {v: k.removeprefix("STOP_REASON_").lower() for k, v in inference_pb2.StopReason.items()}


@dataclass(frozen=True)
class Peers:
    """Where the services a run uses listen."""

    identity: str
    state: str
    inference: str
    credentials: str


class StateStepLog:
    """Steps as events of the state thread named after the run, appended at expected_version."""

    def __init__(self, channel: grpc.aio.Channel):
        self._stub = state_pb2_grpc.StateServiceStub(channel)

    async def append(self, run_id: str, step: Step) -> None:
        """Append at version step.index; StepConflict when someone else wrote first."""
        if step.index == 1:
            with contextlib.suppress(errors.AlreadyExists), peer_call():  # a retried first step: the thread is there
                await self._stub.CreateThread(state_pb2.CreateThreadRequest(thread_id=run_id, run_id=run_id))
        try:
            with peer_call():
                await self._stub.AppendEvents(
                    state_pb2.AppendEventsRequest(
                        thread_id=run_id,
                        expected_version=step.index - 1,
                        events=[state_pb2.NewEvent(type=STEP_EVENT_TYPE, payload=step.to_json())],
                    )
                )
        except errors.Aborted:
            raise StepConflict(f"run {run_id} log moved past step {step.index - 1}") from None

    async def read(self, run_id: str, after: int = 0) -> list[Step]:
        """Every step after `after` (paging through ReadEvents); [] for a run not started yet."""
        steps: list[Step] = []
        token = ""
        while True:
            try:
                with peer_call():
                    resp = await self._stub.ReadEvents(
                        state_pb2.ReadEventsRequest(
                            thread_id=run_id, after_version=after, page_size=1000, page_token=token
                        )
                    )
            except errors.NotFound:
                if steps:
                    raise
                return []  # no thread yet: the run has not started
            steps.extend(Step.from_json(e.payload) for e in resp.events if e.type == STEP_EVENT_TYPE)
            token = resp.next_page_token
            if not token:
                return steps


class StateContext:
    """The run's shared context in state (scope kind RUN); scope strings look like 'run:<id>'."""

    def __init__(self, channel: grpc.aio.Channel):
        self._stub = state_pb2_grpc.StateServiceStub(channel)

    @staticmethod
    def _scope(scope: str) -> state_pb2.ContextScope:
        kind, _, ident = scope.partition(":")
        return state_pb2.ContextScope(
            kind=state_pb2.SCOPE_KIND_TEAM if kind == "team" else state_pb2.SCOPE_KIND_RUN, id=ident
        )

    async def get(self, scope: str, key: str) -> str | None:
        try:
            with peer_call():
                resp = await self._stub.GetContext(state_pb2.GetContextRequest(scope=self._scope(scope), key=key))
        except errors.NotFound:
            return None
        return resp.entry.value.decode()

    async def put(self, scope: str, key: str, value: str) -> None:
        with peer_call():
            await self._stub.PutContext(
                state_pb2.PutContextRequest(scope=self._scope(scope), key=key, value=value.encode())
            )


class InferenceModel:
    """CreateMessage on the inference proxy; the step's request id travels as x-request-id."""

    def __init__(self, channel: grpc.aio.Channel):
        self._stub = inference_pb2_grpc.InferenceServiceStub(channel)

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
        params = inference_pb2.MessageParams(
            model=model,
            system=[inference_pb2.TextBlock(text=system)] if system else [],
            messages=[_message(m) for m in messages],
            max_tokens=max_tokens,
            tools=[
                inference_pb2.Tool(
                    name=t["name"],
                    description=t.get("description", ""),
                    input_schema=_struct(t.get("input_schema") or {}),
                )
                for t in tools
            ],
        )
        ctx = dataclasses.replace(require_tenant(), request_id=request_id, agent_id=agent, run_id=run_id)
        with tenant_scope(ctx), peer_call():
            resp = await self._stub.CreateMessage(inference_pb2.CreateMessageRequest(params=params))
        return ModelReply(
            content=[_block_out(b) for b in resp.content],
            stop_reason=_STOP.get(resp.stop_reason, ""),
            model=resp.model,
            usage={"input_tokens": resp.usage.input_tokens, "output_tokens": resp.usage.output_tokens},
        )


class IdentityDelegator:
    """ExchangeToken: a narrower token for a run, made from the caller's."""

    def __init__(self, channel: grpc.aio.Channel):
        self._stub = identity_pb2_grpc.IdentityServiceStub(channel)

    async def delegate(self, *, scopes: list[str], run_id: str, ttl: int) -> str:
        """The delegated token (the current tenant's request is the delegator)."""
        with peer_call():
            resp = await self._stub.ExchangeToken(
                identity_pb2.ExchangeTokenRequest(scopes=scopes, run_id=run_id, ttl_seconds=ttl)
            )
        return resp.token


def _struct(d: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


def _message(m: dict[str, Any]) -> inference_pb2.Message:
    role = inference_pb2.ROLE_USER if m["role"] == "user" else inference_pb2.ROLE_ASSISTANT
    content = m["content"]
    if isinstance(content, str):
        return inference_pb2.Message(
            role=role, content=[inference_pb2.ContentBlock(text=inference_pb2.TextBlock(text=content))]
        )
    return inference_pb2.Message(role=role, content=[_block_in(b) for b in content])


def _block_in(b: dict[str, Any]) -> inference_pb2.ContentBlock:
    kind = b.get("type")
    if kind == "text":
        return inference_pb2.ContentBlock(text=inference_pb2.TextBlock(text=b.get("text", "")))
    if kind == "tool_use":
        return inference_pb2.ContentBlock(
            tool_use=inference_pb2.ToolUseBlock(id=b["id"], name=b["name"], input=_struct(b.get("input") or {}))
        )
    if kind == "tool_result":
        content = b.get("content", "")
        blocks = (
            [inference_pb2.ContentBlock(text=inference_pb2.TextBlock(text=content))]
            if isinstance(content, str)
            else [_block_in(c) for c in content]
        )
        return inference_pb2.ContentBlock(
            tool_result=inference_pb2.ToolResultBlock(
                tool_use_id=b["tool_use_id"], content=blocks, is_error=bool(b.get("is_error"))
            )
        )
    raise ValueError(f"unsupported content block {kind!r}")


def _block_out(b: inference_pb2.ContentBlock) -> dict[str, Any]:
    which = b.WhichOneof("block")
    if which == "text":
        return {"type": "text", "text": b.text.text}
    if which == "tool_use":
        return {
            "type": "tool_use",
            "id": b.tool_use.id,
            "name": b.tool_use.name,
            "input": json_format.MessageToDict(b.tool_use.input),
        }
    return {"type": which or "unknown"}

"""Translation between bulkhead.inference.v1 messages and the Messages API's JSON shapes.

Requests go proto -> JSON dict (what the SDK sends); replies and stream events go JSON dict
(what the upstream sent) -> proto, field for field. No grpc imports: protobuf messages only.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from google.protobuf import json_format, struct_pb2

from bulkhead.inference.v1 import inference_pb2 as pb

ROLE_NAMES = {pb.ROLE_USER: "user", pb.ROLE_ASSISTANT: "assistant"}
_STOP_REASONS = {
    "end_turn": pb.STOP_REASON_END_TURN,
    "max_tokens": pb.STOP_REASON_MAX_TOKENS,
    "stop_sequence": pb.STOP_REASON_STOP_SEQUENCE,
    "tool_use": pb.STOP_REASON_TOOL_USE,
    "pause_turn": pb.STOP_REASON_PAUSE_TURN,
    "refusal": pb.STOP_REASON_REFUSAL,
    "model_context_window_exceeded": pb.STOP_REASON_MODEL_CONTEXT_WINDOW_EXCEEDED,
}
_TOOL_CHOICE = {
    pb.TOOL_CHOICE_TYPE_AUTO: "auto",
    pb.TOOL_CHOICE_TYPE_ANY: "any",
    pb.TOOL_CHOICE_TYPE_TOOL: "tool",
    pb.TOOL_CHOICE_TYPE_NONE: "none",
}


class WireError(ValueError):
    """A request that cannot be expressed in the Messages API; `field` is its proto path."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


# ----- requests: proto -> JSON -----


def params_to_json(params: pb.MessageParams, *, model: str, max_tokens: int | None) -> dict[str, Any]:
    """The Messages API request body for params, with the resolved model and capped max_tokens."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [_message(m, f"params.messages[{i}]") for i, m in enumerate(params.messages)],
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if params.system:
        body["system"] = [_text(t) for t in params.system]
    if params.tools:
        body["tools"] = [_tool(t, f"params.tools[{i}]") for i, t in enumerate(params.tools)]
    if params.HasField("tool_choice") and params.tool_choice.type:
        body["tool_choice"] = _tool_choice(params.tool_choice)
    if params.HasField("temperature"):
        body["temperature"] = params.temperature
    if params.HasField("top_p"):
        body["top_p"] = params.top_p
    if params.HasField("top_k"):
        body["top_k"] = params.top_k
    if params.stop_sequences:
        body["stop_sequences"] = list(params.stop_sequences)
    return body


def _message(m: pb.Message, path: str) -> dict[str, Any]:
    if m.role not in ROLE_NAMES:
        raise WireError(f"{path}.role", "must be ROLE_USER or ROLE_ASSISTANT")
    if not m.content:
        raise WireError(f"{path}.content", "must have at least one block")
    return {"role": ROLE_NAMES[m.role], "content": [_block(b, f"{path}.content[{i}]") for i, b in enumerate(m.content)]}


def _cache(cc: pb.CacheControl) -> dict[str, Any]:
    out: dict[str, Any] = {"type": cc.type or "ephemeral"}
    if cc.ttl:
        out["ttl"] = cc.ttl
    return out


def _text(t: pb.TextBlock) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "text", "text": t.text}
    if t.HasField("cache_control"):
        out["cache_control"] = _cache(t.cache_control)
    return out


def _block(b: pb.ContentBlock, path: str) -> dict[str, Any]:
    kind = b.WhichOneof("block")
    if kind == "text":
        return _text(b.text)
    if kind == "image":
        return _image(b.image, f"{path}.image")
    if kind == "tool_use":
        return {
            "type": "tool_use",
            "id": b.tool_use.id,
            "name": b.tool_use.name,
            "input": json_format.MessageToDict(b.tool_use.input),
        }
    if kind == "tool_result":
        r = b.tool_result
        if not r.tool_use_id:
            raise WireError(f"{path}.tool_result.tool_use_id", "is required")
        out: dict[str, Any] = {
            "type": "tool_result",
            "tool_use_id": r.tool_use_id,
            "content": [_block(c, f"{path}.tool_result.content[{i}]") for i, c in enumerate(r.content)],
        }
        if r.is_error:
            out["is_error"] = True
        if r.HasField("cache_control"):
            out["cache_control"] = _cache(r.cache_control)
        return out
    if kind == "thinking":
        return {"type": "thinking", "thinking": b.thinking.thinking, "signature": b.thinking.signature}
    if kind == "redacted_thinking":
        return {"type": "redacted_thinking", "data": b.redacted_thinking.data}
    raise WireError(path, "exactly one block kind must be set")


def _image(img: pb.ImageBlock, path: str) -> dict[str, Any]:
    source = img.WhichOneof("source")
    if source == "data":
        if not img.media_type:
            raise WireError(f"{path}.media_type", "is required with data")
        src = {"type": "base64", "media_type": img.media_type, "data": base64.b64encode(img.data).decode()}
    elif source == "url":
        src = {"type": "url", "url": img.url}
    else:
        raise WireError(f"{path}.source", "data or url is required")
    out: dict[str, Any] = {"type": "image", "source": src}
    if img.HasField("cache_control"):
        out["cache_control"] = _cache(img.cache_control)
    return out


def _tool(t: pb.Tool, path: str) -> dict[str, Any]:
    if not t.name:
        raise WireError(f"{path}.name", "is required")
    schema = json_format.MessageToDict(t.input_schema) if t.HasField("input_schema") else {"type": "object"}
    out: dict[str, Any] = {"name": t.name, "input_schema": schema}
    if t.description:
        out["description"] = t.description
    if t.HasField("cache_control"):
        out["cache_control"] = _cache(t.cache_control)
    return out


def _tool_choice(tc: pb.ToolChoice) -> dict[str, Any]:
    out: dict[str, Any] = {"type": _TOOL_CHOICE[tc.type]}
    if tc.type == pb.TOOL_CHOICE_TYPE_TOOL:
        if not tc.name:
            raise WireError("params.tool_choice.name", "is required with TOOL_CHOICE_TYPE_TOOL")
        out["name"] = tc.name
    if tc.disable_parallel_tool_use and tc.type != pb.TOOL_CHOICE_TYPE_NONE:
        out["disable_parallel_tool_use"] = True
    return out


# ----- prompt-cache partition -----

_TTL_RANK = {"5m": 0, "1h": 1}


def has_cache_control(body: dict[str, Any]) -> bool:
    """Whether the request asks the upstream to cache a prefix (any block, tool, or the top level)."""
    if body.get("cache_control"):
        return True
    for tool in body.get("tools") or ():
        if tool.get("cache_control"):
            return True
    return _any_cache_control(body.get("system")) or any(
        _any_cache_control(m.get("content")) for m in body.get("messages") or ()
    )


def _any_cache_control(value: Any) -> bool:
    if isinstance(value, list):
        return any(_any_cache_control(v) for v in value)
    if isinstance(value, dict):
        return bool(value.get("cache_control")) or _any_cache_control(value.get("content"))
    return False


def partition_prompt_cache(body: dict[str, Any], marker: str) -> dict[str, Any]:
    """body with `marker` (a text unique to the caller) where every cached prefix must pass through it.

    The upstream renders a cache prefix as tools, then system, then messages, and a cache hit needs
    the prefix byte for byte. The marker becomes the first system block, right after the tools, so
    every breakpoint in system or messages (and the top-level automatic one, which lands on the last
    block) covers it. A breakpoint on a tool would cache the tools alone, before any system block:
    those breakpoints move onto the marker instead (with the longest TTL among them, so the rule that
    longer TTLs come first still holds), which still caches the tools, now with the marker. The number
    of breakpoints never grows. No change when the request caches nothing. Returns a new dict.
    """
    if not has_cache_control(body):
        return body
    out = dict(body)
    block: dict[str, Any] = {"type": "text", "text": marker}
    moved = [t["cache_control"] for t in out.get("tools") or () if t.get("cache_control")]
    if moved:
        out["tools"] = [{k: v for k, v in t.items() if k != "cache_control"} for t in out["tools"]]
        block["cache_control"] = max(moved, key=lambda cc: _TTL_RANK.get(cc.get("ttl", "5m"), 0))
    system = out.get("system")
    if isinstance(system, str):
        system = [{"type": "text", "text": system}] if system else []
    out["system"] = [block, *(system or ())]
    return out


# ----- replies: JSON -> proto -----


def stop_reason(value: str | None) -> pb.StopReason:
    """The proto enum of a Messages API stop_reason (UNSPECIFIED for null or unknown)."""
    return _STOP_REASONS.get(value or "", pb.STOP_REASON_UNSPECIFIED)


def usage_to_proto(u: dict[str, Any]) -> pb.Usage:
    """Usage JSON (nulls allowed) to proto."""
    return pb.Usage(
        input_tokens=u.get("input_tokens") or 0,
        output_tokens=u.get("output_tokens") or 0,
        cache_creation_input_tokens=u.get("cache_creation_input_tokens") or 0,
        cache_read_input_tokens=u.get("cache_read_input_tokens") or 0,
    )


def block_to_proto(b: dict[str, Any]) -> pb.ContentBlock:
    """One reply content block to proto; block kinds the proto lacks become a text block of their JSON."""
    kind = b.get("type")
    if kind == "text":
        return pb.ContentBlock(text=pb.TextBlock(text=b.get("text", "")))
    if kind == "tool_use":
        args = struct_pb2.Struct()
        args.update(b.get("input") or {})
        return pb.ContentBlock(tool_use=pb.ToolUseBlock(id=b["id"], name=b["name"], input=args))
    if kind == "thinking":
        return pb.ContentBlock(
            thinking=pb.ThinkingBlock(thinking=b.get("thinking", ""), signature=b.get("signature", ""))
        )
    if kind == "redacted_thinking":
        return pb.ContentBlock(redacted_thinking=pb.RedactedThinkingBlock(data=b.get("data", "")))
    return pb.ContentBlock(text=pb.TextBlock(text=json.dumps(b, sort_keys=True)))


def message_to_proto(m: dict[str, Any]) -> pb.CreateMessageResponse:
    """A Messages API reply to CreateMessageResponse (CallInfo is added by the caller)."""
    return pb.CreateMessageResponse(
        id=m.get("id", ""),
        model=m.get("model", ""),
        role=pb.ROLE_ASSISTANT,
        content=[block_to_proto(b) for b in m.get("content") or ()],
        stop_reason=stop_reason(m.get("stop_reason")),
        stop_sequence=m.get("stop_sequence") or "",
        usage=usage_to_proto(m.get("usage") or {}),
    )


def event_to_proto(e: dict[str, Any]) -> pb.StreamMessageResponse | None:
    """One streaming event to proto; None for event types the proto does not carry."""
    kind = e.get("type")
    if kind == "message_start":
        return pb.StreamMessageResponse(message_start=pb.MessageStart(message=message_to_proto(e["message"])))
    if kind == "content_block_start":
        return pb.StreamMessageResponse(
            content_block_start=pb.ContentBlockStart(index=e["index"], content_block=block_to_proto(e["content_block"]))
        )
    if kind == "content_block_delta":
        d = e["delta"]
        delta = pb.ContentBlockDelta(index=e["index"])
        field = {
            "text_delta": "text",
            "input_json_delta": "partial_json",
            "thinking_delta": "thinking",
            "signature_delta": "signature",
        }.get(d.get("type"))
        if field is None:
            return None
        setattr(delta, field, d.get(field, ""))
        return pb.StreamMessageResponse(content_block_delta=delta)
    if kind == "content_block_stop":
        return pb.StreamMessageResponse(content_block_stop=pb.ContentBlockStop(index=e["index"]))
    if kind == "message_delta":
        d = e.get("delta") or {}
        return pb.StreamMessageResponse(
            message_delta=pb.MessageDelta(
                stop_reason=stop_reason(d.get("stop_reason")),
                stop_sequence=d.get("stop_sequence") or "",
                usage=usage_to_proto(e.get("usage") or {}),
            )
        )
    if kind == "message_stop":
        return pb.StreamMessageResponse(message_stop=pb.MessageStop())
    if kind == "ping":
        return pb.StreamMessageResponse(ping=pb.Ping())
    return None


# ----- token estimate -----

_IMAGE_TOKENS = 1600  # the upstream's ceiling for one image
_PER_MESSAGE = 8  # role markers and separators


def estimate_input_tokens(body: dict[str, Any]) -> int:
    """An upper bound of the request's input tokens, used to reserve budget before the call.

    UTF-8 bytes of every text and JSON fragment bound the token count from above (a token is
    at least one byte), plus fixed overheads per message and per image.
    """
    total = 16
    for m in body.get("messages", ()):
        total += _PER_MESSAGE + _fragment_bytes(m.get("content"))
    total += _fragment_bytes(body.get("system"))
    for tool in body.get("tools", ()):
        total += _PER_MESSAGE + len(json.dumps(tool).encode())
    return total


def _fragment_bytes(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        return sum(_fragment_bytes(v) for v in value)
    if isinstance(value, dict):
        if value.get("type") == "image":
            return _IMAGE_TOKENS
        if value.get("type") == "text":
            return len(value.get("text", "").encode())
        if value.get("type") == "tool_result":
            return 8 + _fragment_bytes(value.get("content"))
        return len(json.dumps(value).encode())
    return len(str(value).encode())

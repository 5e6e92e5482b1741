"""Model providers: the Anthropic Messages API through the official SDK, and a deterministic offline one.

A provider takes a Messages API request body (a dict) and returns the upstream's reply as
JSON-shaped dicts, so the proxy can return it field for field. Upstream failures become
UpstreamError with a kind the servicer maps to a status. No grpc imports.
"""
from __future__ import annotations

import collections
import contextvars
import hashlib
import inspect
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import anthropic

from services.inference.upstream_http import make_http_client

OFFLINE = "offline"
ANTHROPIC = "anthropic"

# Fields this SDK version names as keyword arguments; the rest of the Messages API (temperature,
# top_p, top_k in SDKs that dropped them) still goes upstream, as extra_body.
_SDK_FIELDS = frozenset(inspect.signature(anthropic.resources.messages.AsyncMessages.create).parameters) - {"self"}


ATTEMPT_REF: contextvars.ContextVar[str] = contextvars.ContextVar("bulkhead_attempt_ref", default="")
"""An opaque id of the upstream attempt being made (sent as x-bulkhead-attempt; set by the proxy)."""


def _sdk_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    kwargs = {k: v for k, v in body.items() if k in _SDK_FIELDS}
    extra = {k: v for k, v in body.items() if k not in _SDK_FIELDS}
    if extra:
        kwargs["extra_body"] = extra
    ref = ATTEMPT_REF.get()
    if ref:
        # Lets a provider's (or the test fake's) billing records be matched to metered attempts.
        kwargs["extra_headers"] = {"x-bulkhead-attempt": ref}
    return kwargs


class UpstreamError(Exception):
    """The upstream refused or failed a call.

    kind: "rate_limited" (429), "unavailable" (5xx, overloaded, connection), "invalid" (4xx about
    the request), "key_rejected" (401/403). retry_safe: the request certainly did no work upstream.
    """

    def __init__(self, kind: str, message: str, *, status: int = 0, retry_after: float | None = None,
                 retry_safe: bool = False):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.retry_safe = retry_safe


@dataclass(frozen=True)
class Target:
    """Where and as whom to call: a provider key and an optional endpoint of the tenant's own."""

    api_key: str
    base_url: str = ""


class Provider(Protocol):
    """One way to run Messages API requests."""

    name: str

    async def create(self, body: dict[str, Any], target: Target) -> dict[str, Any]: ...

    def stream(self, body: dict[str, Any], target: Target) -> AsyncIterator[dict[str, Any]]: ...

    async def count_tokens(self, body: dict[str, Any], target: Target) -> int: ...


class AnthropicProvider:
    """Calls the Messages API with the official async SDK (its own retries off: the proxy decides)."""

    name = ANTHROPIC

    def __init__(self, *, base_url: str | None, timeout: float = 600.0, max_clients: int = 256):
        self._base_url = base_url or None
        self._timeout = timeout
        self._max_clients = max_clients
        self._clients: collections.OrderedDict[Target, anthropic.AsyncAnthropic] = collections.OrderedDict()

    def _client(self, target: Target) -> anthropic.AsyncAnthropic:
        # One client (and connection pool) per key and endpoint: tenants never share a client
        # that carries another tenant's key.
        client = self._clients.get(target)
        if client is None:
            client = anthropic.AsyncAnthropic(api_key=target.api_key, base_url=target.base_url or self._base_url,
                                              max_retries=0, timeout=self._timeout,
                                              http_client=make_http_client(timeout=self._timeout))
            self._clients[target] = client
            if len(self._clients) > self._max_clients:
                _, old = self._clients.popitem(last=False)
                # Closing would cut calls still using it; its pool is collected with it.
                del old
        else:
            self._clients.move_to_end(target)
        return client

    async def create(self, body: dict[str, Any], target: Target) -> dict[str, Any]:
        """One unary call; the reply exactly as the upstream sent it."""
        try:
            raw = await self._client(target).messages.with_raw_response.create(**_sdk_kwargs(body))
            return json.loads(raw.http_response.content)
        except anthropic.AnthropicError as exc:
            raise _upstream_error(exc, target) from None

    async def stream(self, body: dict[str, Any], target: Target) -> AsyncIterator[dict[str, Any]]:
        """The streaming events of one call, as dicts."""
        started = False
        try:
            events = await self._client(target).messages.create(**_sdk_kwargs(body), stream=True)
            async with events:
                async for event in events:
                    started = True
                    yield event.model_dump(mode="json")
        except anthropic.AnthropicError as exc:
            error = _upstream_error(exc, target)
            error.retry_safe = error.retry_safe and not started
            raise error from None
        except Exception as exc:  # noqa: BLE001 - the transport broke mid-stream (httpx errors are not wrapped)
            raise UpstreamError("unavailable", f"upstream stream broke: {type(exc).__name__}") from None

    async def count_tokens(self, body: dict[str, Any], target: Target) -> int:
        """The upstream's input token count of a request."""
        body = {k: v for k, v in body.items() if k in ("model", "messages", "system", "tools", "tool_choice")}
        try:
            return (await self._client(target).messages.count_tokens(**body)).input_tokens
        except anthropic.AnthropicError as exc:
            raise _upstream_error(exc, target) from None

    async def close(self) -> None:
        """Close every client's connection pool."""
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


def _upstream_error(exc: anthropic.AnthropicError, target: Target) -> UpstreamError:
    """Map an SDK error to UpstreamError, never echoing the key."""
    if isinstance(exc, anthropic.APIStatusError):
        status = exc.status_code
        detail = _error_message(exc).replace(target.api_key, "[redacted]") if target.api_key else _error_message(exc)
        if status == 429:
            return UpstreamError("rate_limited", f"upstream rate limit: {detail}", status=status,
                                 retry_after=_retry_after(exc), retry_safe=True)
        if status in (401, 403):
            return UpstreamError("key_rejected", "the upstream rejected the provider key", status=status)
        if status >= 500:
            return UpstreamError("unavailable", f"upstream error {status}: {detail}", status=status,
                                 retry_after=_retry_after(exc), retry_safe=True)
        return UpstreamError("invalid", f"upstream refused the request: {detail}", status=status)
    if isinstance(exc, anthropic.APITimeoutError):
        return UpstreamError("unavailable", "upstream timed out")
    if isinstance(exc, anthropic.APIConnectionError):
        # Not even connected: the upstream cannot have done any work, so a retry is safe.
        refused = "connect" in type(exc.__cause__).__name__.lower()
        return UpstreamError("unavailable", "upstream unreachable", retry_safe=refused)
    return UpstreamError("unavailable", f"upstream call failed: {type(exc).__name__}")


def _error_message(exc: anthropic.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    return str(error.get("message") or exc.message)[:500]


def _retry_after(exc: anthropic.APIStatusError) -> float | None:
    headers = exc.response.headers
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return float(value) * scale
            except ValueError:
                return None
    return None


class OfflineProvider:
    """A deterministic stand-in for the embedded default and demos: no network, no key.

    It answers "[offline <model>] <the last user text>" and counts a token per whitespace word. Offered
    tools, it calls each once in order (or the one tool_choice names), then answers with the last tool
    result, so teams with hand-offs and tools can be exercised end to end without a model.
    """

    name = OFFLINE

    async def create(self, body: dict[str, Any], target: Target) -> dict[str, Any]:
        """A reply computed only from the request."""
        return _offline_message(body)

    async def stream(self, body: dict[str, Any], target: Target) -> AsyncIterator[dict[str, Any]]:
        """The same reply as create, as streaming events."""
        message = _offline_message(body)
        yield {"type": "message_start", "message": {**message, "content": [], "stop_reason": None,
                                                    "usage": {**message["usage"], "output_tokens": 1}}}
        for index, block in enumerate(message["content"]):
            if block["type"] == "text":
                yield {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}
                for word in block["text"].split(" "):
                    yield {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": word + " "}}
            else:
                yield {"type": "content_block_start", "index": index, "content_block": {**block, "input": {}}}
                yield {"type": "content_block_delta", "index": index,
                       "delta": {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}}
            yield {"type": "content_block_stop", "index": index}
        yield {"type": "message_delta", "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
               "usage": {"output_tokens": message["usage"]["output_tokens"]}}
        yield {"type": "message_stop"}

    async def count_tokens(self, body: dict[str, Any], target: Target) -> int:
        """Whitespace words of the request."""
        return _words([body.get("system"), body.get("messages"), body.get("tools")])


def _words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, dict):
        return sum(_words(v) for k, v in value.items() if k not in ("type", "cache_control"))
    if isinstance(value, list):
        return sum(_words(v) for v in value)
    return 0


def _offline_message(body: dict[str, Any]) -> dict[str, Any]:
    last = ""
    for m in reversed(body.get("messages", [])):
        if m.get("role") == "user":
            content = m.get("content")
            last = content if isinstance(content, str) else " ".join(
                b.get("text", "") for b in content or () if b.get("type") == "text")
            break
    words = f"[offline {body['model']}] {last}".split()[: max(1, body.get("max_tokens", 1))]
    choice = (body.get("tool_choice") or {}).get("type", "auto")
    tools = body.get("tools") or []
    tool = _next_tool(body, tools, choice)
    if tool is not None:
        content = [{"type": "tool_use", "id": "toolu_offline_" + _digest(body)[:12], "name": tool["name"],
                    "input": _example_input(tool.get("input_schema") or {})}]
        stop = "tool_use"
    else:
        results = _tool_results(body)
        if results:  # an agent that used its tools reports what they returned
            words = f"[offline {body['model']}] done. {results[-1]}".split()[: max(1, body.get("max_tokens", 1))]
        content = [{"type": "text", "text": " ".join(words)}]
        stop = "end_turn" if len(words) < body.get("max_tokens", 1) else "max_tokens"
    return {"id": "msg_offline_" + _digest(body)[:20], "type": "message", "role": "assistant",
            "model": body["model"], "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": max(1, _words([body.get("system"), body.get("messages"), body.get("tools")])),
                      "output_tokens": max(1, _words(content)),
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}


def _next_tool(body: dict[str, Any], tools: list[dict[str, Any]], choice: str) -> dict[str, Any] | None:
    """The tool the offline model calls now: the forced one, or (auto) the first it has not called yet.

    So an agent offered tools uses each once, in the order given, then answers: enough to drive
    hand-offs and tool calls end to end without a model.
    """
    if not tools or choice == "none":
        return None
    if choice == "tool":
        return next((t for t in tools if t["name"] == body["tool_choice"].get("name")), tools[0])
    if choice == "any":
        return tools[0]
    used = {b.get("name") for m in body.get("messages", []) if m.get("role") == "assistant"
            and isinstance(m.get("content"), list) for b in m["content"] if b.get("type") == "tool_use"}
    return next((t for t in tools if t["name"] not in used), None)


def _tool_results(body: dict[str, Any]) -> list[str]:
    """Text of every tool_result the conversation holds, oldest first."""
    out = []
    for m in body.get("messages", []):
        if m.get("role") == "user" and isinstance(m.get("content"), list):
            for b in m["content"]:
                if b.get("type") == "tool_result":
                    c = b.get("content")
                    out.append(c if isinstance(c, str) else " ".join(x.get("text", "") for x in c or ()
                                                                        if isinstance(x, dict)))
    return out


def _example_input(schema: dict[str, Any]) -> dict[str, Any]:
    """A deterministic input that satisfies a simple JSON schema: first enum value, else a typed placeholder."""
    placeholder = {"string": "offline", "integer": 1, "number": 1, "boolean": True, "array": [], "object": {}}
    out = {}
    for name, prop in (schema.get("properties") or {}).items():
        out[name] = (prop.get("enum") or [placeholder.get(prop.get("type"), "offline")])[0]
    return out


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

"""A fake Anthropic Messages API upstream for tests and benchmarks.

It speaks the real wire format (JSON replies, server-sent events for ``stream: true``, the
API's error bodies and ``retry-after`` headers) on a free loopback port, so code under test
uses the official ``anthropic`` SDK unchanged::

    async with FakeAnthropic() as fake:
        client = anthropic.AsyncAnthropic(base_url=fake.base_url, api_key="test")
        fake.script(Reply.tool_use("get_weather", {"city": "Oslo"}))   # the next reply
        fake.fail_next(Fault.http(429, retry_after=1.5))               # ...after one 429
        ...
        assert fake.request_count == 2 and fake.usage_log[-1].usage["output_tokens"] == 7

What it records: ``calls`` (model requests: method, path, headers, JSON body), ``replies`` (each
message it answered with), ``sent_events`` (SSE events per stream, fewer when dropped) and
``usage_log`` (the usage it reported per call, with ``user_id``, the key used and the proxy's
``x-bulkhead-attempt`` id: what a provider would bill, journalled per attempt; ``journal_path`` also
appends each record as a JSON line, flushed at once, for a fake in another process). Knobs:
``delay`` (latency before each reply), ``event_delay`` (between SSE events), faults
``Fault.http(status, retry_after=, message=)``, ``Fault.overloaded()``, ``Fault.slow(s)``,
``Fault.disconnect(after_events=n)``; ``POST /v1/messages/count_tokens`` works.

Prompt caching is simulated per API key, as the real API caches per organisation: the prefix up to
each ``cache_control`` breakpoint (tools, then system, then messages; or the last block with a
top-level ``cache_control``) is stored by its digest (``cache_prefixes(body)``), and a later call
whose breakpoint prefix is stored reports those tokens as ``cache_read_input_tokens`` (the rest up
to its last breakpoint as ``cache_creation_input_tokens``). A scripted reply's usage overrides it.

Replies are deterministic: without a script the fake echoes the last user text. Token counts
are whitespace word counts (never more than the request's UTF-8 byte length), so a caller
that estimates tokens by bytes never under-reserves.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import itertools
import json
from typing import Any, Self

__all__ = ["FakeAnthropic", "Fault", "RecordedRequest", "Reply", "UsageRecord", "cache_prefixes", "count_words"]

_STATUS_TEXT = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
    529: "Overloaded",
}
_ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


@dataclasses.dataclass(frozen=True)
class Reply:
    """A scripted reply: content blocks, stop reason and (optionally) exact usage."""

    content: tuple[dict[str, Any], ...]
    """Messages API content blocks, e.g. ``{"type": "text", "text": "hi"}``."""
    stop_reason: str = "end_turn"
    """The reply's stop_reason."""
    stop_sequence: str | None = None
    """The stop sequence that was hit, if any."""
    usage: dict[str, int] | None = None
    """Exact usage to report; None derives it from the request and reply."""
    model: str | None = None
    """Model to report; None echoes the requested model."""

    @classmethod
    def text(cls, text: str, **kw: Any) -> Reply:
        """A reply with one text block."""
        return cls(content=({"type": "text", "text": text},), **kw)

    @classmethod
    def tool_use(
        cls,
        name: str,
        tool_input: dict[str, Any],
        *,
        tool_id: str = "toolu_fake_1",
        preamble: str | None = None,
        **kw: Any,
    ) -> Reply:
        """A reply that calls one tool, optionally after some text."""
        blocks: list[dict[str, Any]] = []
        if preamble:
            blocks.append({"type": "text", "text": preamble})
        blocks.append({"type": "tool_use", "id": tool_id, "name": name, "input": tool_input})
        return cls(content=tuple(blocks), stop_reason="tool_use", **kw)


@dataclasses.dataclass(frozen=True)
class Fault:
    """Something to go wrong with one request instead of (or during) a normal reply."""

    kind: str
    """"status", "slow" or "disconnect"."""
    status: int = 0
    """HTTP status for kind "status"."""
    retry_after: float | None = None
    """Value of the retry-after header sent with a status fault."""
    seconds: float = 0.0
    """Extra delay for kind "slow" (the reply still arrives)."""
    after_events: int = 0
    """For kind "disconnect": SSE events sent before the connection drops (0 drops before any reply)."""
    message: str | None = None
    """The error body's message for a status fault (default "injected <status>")."""

    @classmethod
    def http(cls, status: int, *, retry_after: float | None = None, message: str | None = None) -> Fault:
        """Answer with this HTTP error status (429, 500, 400, ...) and the API's error body."""
        return cls(kind="status", status=status, retry_after=retry_after, message=message)

    @classmethod
    def overloaded(cls) -> Fault:
        """The API's 529 overloaded_error."""
        return cls(kind="status", status=529)

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        """Reply normally, but only after this many extra seconds."""
        return cls(kind="slow", seconds=seconds)

    @classmethod
    def disconnect(cls, *, after_events: int = 0) -> Fault:
        """Drop the connection: before any reply, or mid-stream after this many SSE events."""
        return cls(kind="disconnect", after_events=after_events)


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request the fake received."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class UsageRecord:
    """Usage the fake reported to a client for one model call (what a provider would bill)."""

    message_id: str
    model: str
    user_id: str | None
    """The request's metadata.user_id (the opaque caller id)."""
    api_key: str | None
    """The x-api-key header the call was made with."""
    usage: dict[str, int]
    streamed: bool
    completed: bool
    """False when the fake dropped the stream before message_stop."""
    attempt_ref: str | None = None
    """The request's x-bulkhead-attempt header: which metered attempt this bill belongs to."""


def count_words(value: Any) -> int:
    """Deterministic token count of any request fragment: the number of whitespace-separated words."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, dict):
        return sum(count_words(v) for k, v in value.items() if k not in ("type", "role", "cache_control", "media_type"))
    if isinstance(value, (list, tuple)):
        return sum(count_words(v) for v in value)
    return 0


def _cache_segments(body: dict[str, Any]) -> list[tuple[Any, bool]]:
    """The request's pieces in the order the API renders a cache prefix (tools, system, messages),
    each without its cache_control and with whether it is a breakpoint."""
    pieces: list[tuple[Any, bool]] = []

    def add(kind: str, item: Any, role: str | None = None) -> None:
        if isinstance(item, dict):
            bare = {k: v for k, v in item.items() if k != "cache_control"}
            pieces.append(((kind, role, bare), bool(item.get("cache_control"))))
        else:
            pieces.append(((kind, role, item), False))

    for tool in body.get("tools") or ():
        add("tool", tool)
    system = body.get("system")
    for block in [{"type": "text", "text": system}] if isinstance(system, str) else system or ():
        add("system", block)
    for message in body.get("messages") or ():
        content = message.get("content")
        for block in [{"type": "text", "text": content}] if isinstance(content, str) else content or ():
            add("message", block, message.get("role"))
    if body.get("cache_control") and pieces:  # automatic caching: the breakpoint is the last block
        pieces[-1] = (pieces[-1][0], True)
    return pieces


def cache_prefixes(body: dict[str, Any]) -> list[tuple[str, int]]:
    """For each cache_control breakpoint of a request, in order: the digest of the prefix up to and
    including it (what the upstream's prompt cache is keyed by) and that prefix's token count."""
    out = []
    digest = hashlib.sha256()
    tokens = 0
    for piece, breakpoint in _cache_segments(body):
        digest.update(json.dumps(piece, sort_keys=True).encode() + b"\0")
        tokens += count_words(piece[2])
        if breakpoint:
            out.append((digest.copy().hexdigest(), tokens))
    return out


class FakeAnthropic:
    """An HTTP/1.1 server on 127.0.0.1 that answers like api.anthropic.com."""

    def __init__(
        self, *, delay: float = 0.0, event_delay: float = 0.0, chunk_words: int = 2, journal_path: str | None = None
    ) -> None:
        self.journal_path = journal_path
        """Where to append every usage record as a JSON line (None: memory only)."""
        self.delay = delay
        """Seconds every model reply waits before its first byte (the upstream's latency)."""
        self.event_delay = event_delay
        """Seconds between two SSE events of a stream (to catch a stream mid-way)."""
        self.chunk_words = chunk_words
        self.requests: list[RecordedRequest] = []
        self.usage_log: list[UsageRecord] = []
        self.replies: list[dict[str, Any]] = []
        """Every message the fake answered with (unary body, or the message a stream spelled out)."""
        self.sent_events: list[list[dict[str, Any]]] = []
        """For each stream, the SSE events actually sent (fewer when it was dropped)."""
        self._scripts: collections.deque[Reply] = collections.deque()
        self._faults: collections.deque[Fault] = collections.deque()
        self._ids = itertools.count(1)
        self.prompt_cache: set[tuple[str | None, str]] = set()
        """Cached prefixes as (API key, prefix digest): a key's calls hit only what that key cached."""
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    # ----- lifecycle -----
    async def start(self) -> Self:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening and drop open connections."""
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        """The URL to give ``AsyncAnthropic(base_url=...)``."""
        return f"http://127.0.0.1:{self.port}"

    # ----- scripting -----
    def script(self, *replies: Reply) -> None:
        """Queue replies for the next model calls (in order); unscripted calls echo."""
        self._scripts.extend(replies)

    def fail_next(self, *faults: Fault) -> None:
        """Queue faults for the next model calls (in order), before any scripted replies are used."""
        self._faults.extend(faults)

    @property
    def calls(self) -> list[RecordedRequest]:
        """Model calls received (POST /v1/messages), including failed ones."""
        return [r for r in self.requests if r.path.startswith("/v1/messages") and not r.path.endswith("count_tokens")]

    @property
    def request_count(self) -> int:
        """How many model calls reached the fake."""
        return len(self.calls)

    def reset(self) -> None:
        """Forget recorded requests, usage, scripts and faults."""
        self.requests.clear()
        self.usage_log.clear()
        self.replies.clear()
        self.sent_events.clear()
        self.prompt_cache.clear()
        self._scripts.clear()
        self._faults.clear()

    def _bill(self, record: UsageRecord) -> None:
        self.usage_log.append(record)
        if self.journal_path:
            with open(self.journal_path, "a") as f:
                f.write(json.dumps(dataclasses.asdict(record)) + "\n")

    # ----- HTTP -----
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                raw = await reader.readexactly(int(headers.get("content-length", "0")))
                body = json.loads(raw) if raw else {}
                request = RecordedRequest(method, path.split("?")[0], headers, body)
                self.requests.append(request)
                if not await self._dispatch(request, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            # Shutdown with a keep-alive connection open: end quietly (asyncio would log a cancelled
            # connection task as an error).
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _dispatch(self, request: RecordedRequest, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False means the connection must be closed."""
        if request.path == "/v1/messages/count_tokens":
            await self._send_json(writer, 200, {"input_tokens": self._input_tokens(request.body)})
            return True
        if request.path != "/v1/messages" or request.method != "POST":
            await self._send_error(writer, 404, f"no route {request.method} {request.path}")
            return True
        problem = _validate(request.body)
        if problem:
            await self._send_error(writer, 400, problem)
            return True
        fault = self._faults.popleft() if self._faults else None
        if fault is not None and fault.kind == "status":
            headers = {} if fault.retry_after is None else {"retry-after": f"{fault.retry_after:g}"}
            await self._send_error(writer, fault.status, fault.message or f"injected {fault.status}", headers)
            return True
        if fault is not None and fault.kind == "disconnect" and fault.after_events == 0:
            return False
        delay = self.delay + (fault.seconds if fault is not None and fault.kind == "slow" else 0.0)
        if delay:
            await asyncio.sleep(delay)
        message = self._build_message(request.body, _api_key(request.headers))
        self.replies.append(message)
        record = {
            "message_id": message["id"],
            "model": message["model"],
            "user_id": (request.body.get("metadata") or {}).get("user_id"),
            "api_key": _api_key(request.headers),
            "attempt_ref": request.headers.get("x-bulkhead-attempt"),
        }
        if not request.body.get("stream"):
            self._bill(UsageRecord(**record, usage=dict(message["usage"]), streamed=False, completed=True))
            await self._send_json(writer, 200, message)
            return True
        drop_after = fault.after_events if fault is not None and fault.kind == "disconnect" else None
        return await self._send_stream(writer, message, record, drop_after)

    async def _send_stream(
        self, writer: asyncio.StreamWriter, message: dict[str, Any], record: dict[str, Any], drop_after: int | None
    ) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"request-id: req_fake\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        reported = {
            "input_tokens": message["usage"]["input_tokens"],
            "output_tokens": 1,
            "cache_creation_input_tokens": message["usage"]["cache_creation_input_tokens"],
            "cache_read_input_tokens": message["usage"]["cache_read_input_tokens"],
        }
        sent: list[dict[str, Any]] = []
        self.sent_events.append(sent)
        for n, event in enumerate(self._events(message)):
            if drop_after is not None and n >= drop_after:
                self._bill(UsageRecord(**record, usage=reported, streamed=True, completed=False))
                writer.transport.abort()
                return False
            if event["type"] == "message_delta":
                reported = {**reported, "output_tokens": event["usage"]["output_tokens"]}
            if n and self.event_delay:
                await asyncio.sleep(self.event_delay)
            sent.append(event)
            data = f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        self._bill(UsageRecord(**record, usage=reported, streamed=True, completed=True))
        return True

    def _events(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """The SSE events of a message, as the real API orders them."""
        start = {
            **message,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**message["usage"], "output_tokens": 1},
        }
        events: list[dict[str, Any]] = [{"type": "message_start", "message": start}]
        for index, block in enumerate(message["content"]):
            if block["type"] == "text":
                events.append(
                    {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}
                )
                for piece in self._chunks(block["text"]):
                    events.append(
                        {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": piece}}
                    )
            elif block["type"] == "tool_use":
                events.append({"type": "content_block_start", "index": index, "content_block": {**block, "input": {}}})
                text = json.dumps(block["input"])
                for i in range(0, len(text), 12):
                    events.append(
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": text[i : i + 12]},
                        }
                    )
            elif block["type"] == "thinking":
                events.append(
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {"type": "thinking", "thinking": "", "signature": ""},
                    }
                )
                events.append(
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "thinking_delta", "thinking": block["thinking"]},
                    }
                )
                events.append(
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "signature_delta", "signature": block["signature"]},
                    }
                )
            else:
                events.append({"type": "content_block_start", "index": index, "content_block": block})
            events.append({"type": "content_block_stop", "index": index})
            if index == 0:
                events.append({"type": "ping"})
        events.append(
            {
                "type": "message_delta",
                "delta": {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]},
                "usage": {"output_tokens": message["usage"]["output_tokens"]},
            }
        )
        events.append({"type": "message_stop"})
        return events

    def _chunks(self, text: str) -> list[str]:
        words = text.split(" ")
        size = max(1, self.chunk_words)
        return [
            " ".join(words[i : i + size]) + (" " if i + size < len(words) else "") for i in range(0, len(words), size)
        ] or [""]

    def _build_message(self, body: dict[str, Any], api_key: str | None = None) -> dict[str, Any]:
        reply = self._scripts.popleft() if self._scripts else Reply.text("Echo: " + _last_user_text(body))
        input_tokens = self._input_tokens(body)
        read, written = self._use_prompt_cache(body, api_key)
        usage = {
            "input_tokens": max(0, input_tokens - read - written),
            "output_tokens": max(1, count_words(list(reply.content))),
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": read,
        }
        if reply.usage:
            usage.update(reply.usage)
        return {
            "id": f"msg_fake_{next(self._ids):06d}",
            "type": "message",
            "role": "assistant",
            "model": reply.model or body["model"],
            "content": [dict(b) for b in reply.content],
            "stop_reason": reply.stop_reason,
            "stop_sequence": reply.stop_sequence,
            "usage": usage,
        }

    def _use_prompt_cache(self, body: dict[str, Any], api_key: str | None) -> tuple[int, int]:
        """Tokens read from and written to this key's prompt cache by a call: the longest stored
        breakpoint prefix is read, the rest up to the last breakpoint written (and every breakpoint stored)."""
        prefixes = cache_prefixes(body)
        if not prefixes:
            return 0, 0
        read = max((tokens for digest, tokens in prefixes if (api_key, digest) in self.prompt_cache), default=0)
        self.prompt_cache.update((api_key, digest) for digest, _ in prefixes)
        return read, prefixes[-1][1] - read

    @staticmethod
    def _input_tokens(body: dict[str, Any]) -> int:
        return max(1, count_words([body.get("system", ""), body.get("messages", []), body.get("tools", [])]))

    async def _send_json(
        self, writer: asyncio.StreamWriter, status: int, payload: dict[str, Any], extra: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        head = [
            f"HTTP/1.1 {status} {_STATUS_TEXT.get(status, 'Error')}",
            "content-type: application/json",
            f"content-length: {len(data)}",
            "request-id: req_fake",
        ]
        head += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        await writer.drain()

    async def _send_error(
        self, writer: asyncio.StreamWriter, status: int, message: str, extra: dict[str, str] | None = None
    ) -> None:
        error_type = _ERROR_TYPE.get(status, "api_error" if status >= 500 else "invalid_request_error")
        await self._send_json(
            writer,
            status,
            {"type": "error", "error": {"type": error_type, "message": message}},
            {"x-should-retry": "true" if status in (429, 529) or status >= 500 else "false", **(extra or {})},
        )


def _api_key(headers: dict[str, str]) -> str | None:
    """The key a call was made with: x-api-key, or the bearer token newer SDKs send."""
    if "x-api-key" in headers:
        return headers["x-api-key"]
    auth = headers.get("authorization", "")
    return auth[7:] if auth.lower().startswith("bearer ") else None


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages", [])):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        texts = [b.get("text", "") for b in content or () if b.get("type") == "text"]
        if texts:
            return " ".join(texts)
    return ""


def _validate(body: dict[str, Any]) -> str | None:
    """The few checks the real API makes that tests rely on (400 invalid_request_error)."""
    if not body.get("model"):
        return "model: Field required"
    if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
        return "max_tokens: must be a positive integer"
    if not body.get("messages"):
        return "messages: at least one message is required"
    return None

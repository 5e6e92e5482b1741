"""Model providers: the Anthropic Messages API, and a deterministic offline one.

A provider takes a Messages API request body (a dict) and returns the upstream's reply as
JSON-shaped dicts, so the proxy can return it field for field. Upstream failures become
UpstreamError with a kind the servicer maps to a status. No grpc imports.

Every call goes through the official SDK by default, imported on first use so an idle proxy does not carry it,
and then only the parts of it the proxy uses (sdk_import). Unary calls are the SDK's own POST of the body's
JSON bytes, read back raw (no per-call models), carried on the proxy's kept-alive pool
(upstream_http.UpstreamPool, through the SDK's http_client hook: sdk_http.PoolClient on
sdk_http.PoolTransport). Streams and token counts use the SDK's aiohttp transport
(anthropic.DefaultAioHttpClient, the `anthropic[aiohttp]` extra) when it is installed, else its httpx stack.
BULKHEAD_INFERENCE_UPSTREAM_TRANSPORT picks another way for unary calls: sdk-aiohttp (the SDK's aiohttp
transport for them too), sdk-httpx (the SDK's httpx stack for everything, about twice the CPU per call) or
direct (opt-in: the proxy writes unary requests on the pool itself, bypassing the SDK, the least CPU). With an
HTTP proxy configured only the SDK's own transports are used.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import hashlib
import inspect
import json
import logging
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from services.inference import sdk_import, upstream_http
from services.inference.upstream_http import (
    UpstreamPool,
    make_http_client,
    proxies_configured,
)

if TYPE_CHECKING:
    import anthropic

    from services.inference.config import InferenceConfig

log = logging.getLogger("bulkhead.inference.upstream")

OFFLINE = "offline"
ANTHROPIC = "anthropic"
DEFAULT_BASE_URL = "https://api.anthropic.com"
"""The SDK's default upstream."""
API_VERSION = "2026-10-21"
"""The anthropic-version header unary calls send: the one the SDK in use sends (a test compares them)."""

_sdk_fields: frozenset | None = None
"""The SDK's keyword fields once it is imported: a constant of the SDK, no request's data."""


def _sdk() -> Any:
    """The anthropic SDK, imported on first use (streams, token counts, an HTTP proxy in the environment),
    without the packages the proxy never touches (sdk_import)."""
    return sdk_import.anthropic_sdk()


_sdk_ready = False


async def _load_sdk() -> None:
    """Import the SDK on first use in a worker thread: the import takes from half a second to seconds on a
    busy machine, and the event loop keeps serving the calls in flight meanwhile (callers that come during
    it wait for the same import: Python's import lock)."""
    global _sdk_ready
    if not _sdk_ready:
        await asyncio.to_thread(_sdk)
        _sdk_ready = True


def _fields() -> frozenset[str]:
    """Fields this SDK version names as keyword arguments; the rest of the Messages API (temperature,
    top_p, top_k in SDKs that dropped them) still goes upstream, as extra_body."""
    global _sdk_fields
    if _sdk_fields is None:
        _sdk_fields = frozenset(inspect.signature(_sdk().resources.messages.AsyncMessages.create).parameters) - {"self"}
    return _sdk_fields


ATTEMPT_REF: contextvars.ContextVar[str] = contextvars.ContextVar("bulkhead_attempt_ref", default="")
"""An opaque id of the upstream attempt being made (sent as x-bulkhead-attempt; set by the proxy)."""


def _post_options(entry: _Upstream, url: str) -> Any:
    """The options client.post(url, cast_to=httpx2.Response, content=..., options={"headers": ...,
    "max_retries": 0}) builds, made once per key and endpoint: each call copies them with its own body and
    headers (the SDK copies them again before it changes any). Building them (a pydantic model of 20
    fields, each default computed) was about 20 us of CPU per call. max_retries: the client's own (0),
    given so the SDK does not deep-copy its default on every call."""
    if entry.post_options is None:
        from anthropic._models import FinalRequestOptions

        entry.post_options = FinalRequestOptions.construct(
            method="post", url=url, json_data=None, content=None, files=None, headers={}, max_retries=0
        )
    return entry.post_options


def _sdk_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    fields = _fields()
    kwargs = {k: v for k, v in body.items() if k in fields}
    extra = {k: v for k, v in body.items() if k not in fields}
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

    def __init__(
        self, kind: str, message: str, *, status: int = 0, retry_after: float | None = None, retry_safe: bool = False
    ):
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


class _Upstream:
    """What the provider keeps per key and endpoint: the lean pool for unary calls (direct, or under the SDK),
    the SDK client on its own transport for the rest."""

    __slots__ = ("base_url", "evicted", "head", "http", "in_flight", "pool", "pooled_sdk", "post_options", "sdk")

    def __init__(self, base_url: str, http: Any, pool: UpstreamPool | None, head: bytes):
        self.base_url = base_url
        self.http = http
        self.pool = pool
        self.sdk: anthropic.AsyncAnthropic | None = None
        self.pooled_sdk: anthropic.AsyncAnthropic | None = None
        """The SDK client whose transport is the pool (sdk_http.PoolTransport): unary calls by default."""
        self.head = head
        """The request line and headers every unary call to this key and endpoint starts with."""
        self.post_options: Any = None
        """The SDK's request options of a unary call here, but its body and headers (_post_options)."""
        self.in_flight = 0
        """Calls using this entry's clients now."""
        self.evicted = False
        """Dropped from the provider's clients: its HTTP client closes when its last call ends."""

    def enter(self) -> None:
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if self.evicted and self.in_flight == 0:
            _close_later(self)


def _close_later(entry: _Upstream) -> None:
    """Close an evicted entry's HTTP clients in the background (an aiohttp session must be closed, not
    collected)."""
    import asyncio

    async def close() -> None:
        try:
            await _close_entry(entry)
        except Exception as exc:  # noqa: BLE001 - best effort: the connections go with the process anyway
            log.debug("closing an evicted upstream client failed: %s", type(exc).__name__)

    task = asyncio.get_running_loop().create_task(close())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


_closing: set = set()
"""Background closes of evicted clients (kept referenced until done)."""


async def _close_entry(entry: _Upstream) -> None:
    """Close an entry's SDK clients and connection pool."""
    if entry.sdk is not None:
        await entry.sdk.close()
    elif entry.http is not None:
        await entry.http.aclose()
    if entry.pooled_sdk is not None:
        await entry.pooled_sdk.close()
    if entry.pool is not None:
        await entry.pool.close()


class AnthropicProvider:
    """Calls the Messages API with the official async SDK (its own retries off: the proxy decides).

    pooled: the SDK's unary calls travel on the proxy's kept-alive pool (sdk_http.PoolTransport), streams
    and token counts on the SDK's own transport (`http`). direct: unary calls skip the SDK and are written
    on that pool by the proxy itself."""

    name = ANTHROPIC

    def __init__(
        self,
        *,
        base_url: str | None,
        timeout: float = 600.0,
        max_clients: int = 256,
        direct: bool = False,
        pooled: bool = False,
        http: str = "aiohttp",
    ):
        """http: the SDK's transport, "aiohttp" (when installed; else "httpx") or "httpx"."""
        self._base_url = base_url or None
        self._direct = direct
        self._pooled = pooled
        self._http = "aiohttp" if http == "aiohttp" and upstream_http.aiohttp_available() else "httpx"
        self._timeout = timeout
        self._max_clients = max_clients
        self._clients: collections.OrderedDict[Target, _Upstream] = collections.OrderedDict()

    def _upstream(self, target: Target) -> _Upstream:
        # One client (and connection pool) per key and endpoint: tenants never share a client
        # that carries another tenant's key.
        entry = self._clients.get(target)
        if entry is None:
            base_url = (target.base_url or self._base_url or DEFAULT_BASE_URL).rstrip("/")
            # With an HTTP proxy configured only the SDK's own transports reach the upstream.
            lean = (self._direct or self._pooled) and not proxies_configured()
            pool = UpstreamPool(base_url, timeout=self._timeout) if lean else None
            # The SDK's HTTP client is made with its SDK client (_client); a pool may never need it.
            http = None if pool is not None else make_http_client(timeout=self._timeout, transport=self._http)
            head = b""
            if pool is not None and self._direct:
                head = pool.request_head("/v1/messages") + (
                    f"authorization: Bearer {target.api_key}\r\nanthropic-version: {API_VERSION}\r\n"
                    "content-type: application/json\r\naccept: application/json\r\n"
                    "user-agent: bulkhead-inference\r\n"
                ).encode("latin-1")
            entry = self._clients[target] = _Upstream(base_url, http, pool, head)
            if len(self._clients) > self._max_clients:
                _, old = self._clients.popitem(last=False)
                # Closing would cut calls still using it: it closes when its last call ended.
                old.evicted = True
                if old.in_flight == 0:
                    _close_later(old)
        else:
            self._clients.move_to_end(target)
        return entry

    def _client(self, target: Target) -> anthropic.AsyncAnthropic:
        entry = self._upstream(target)
        if entry.sdk is None:
            if entry.http is None:
                entry.http = make_http_client(timeout=self._timeout, transport=self._http)
            entry.sdk = self._new_sdk(target, target.base_url or self._base_url, entry.http)
        return entry.sdk

    def _pooled_client(self, target: Target, entry: _Upstream) -> anthropic.AsyncAnthropic:
        """The SDK client of a key and endpoint whose transport is the entry's pool."""
        if entry.pooled_sdk is None:
            from services.inference.sdk_http import PoolClient, PoolTransport

            assert entry.pool is not None, "a pooled SDK client needs the entry's pool"
            # No redirects (PoolClient never follows one): the Messages API sends none, and a key must not follow
            # one to another origin.
            http = PoolClient(PoolTransport(entry.pool, entry.base_url), timeout=self._timeout)
            entry.pooled_sdk = self._new_sdk(target, entry.base_url, http)
        return entry.pooled_sdk

    def _new_sdk(self, target: Target, base_url: str | None, http: Any) -> anthropic.AsyncAnthropic:
        # open_telemetry=False: no SDK span per call. The proxy's own span of the call (tenant, request
        # id, model, provider) is the trace; the SDK's built its attributes on every call (about 0.4 ms
        # of CPU with a recording tracer) and would send the trace context to the upstream.
        return _sdk().AsyncAnthropic(
            api_key=target.api_key,
            base_url=base_url,
            max_retries=0,
            timeout=self._timeout,
            http_client=http,
            open_telemetry=False,
        )

    async def create(self, body: dict[str, Any], target: Target) -> dict[str, Any]:
        """One unary call; the reply exactly as the upstream sent it."""
        if not upstream_http.header_safe(target.api_key):  # a tenant's key must not add header lines
            raise UpstreamError("key_rejected", "the provider key is not a valid header value")
        try:
            entry = self._upstream(target)
        except ValueError:  # an endpoint that is no http(s) URL (policy checks private models' URLs)
            raise UpstreamError("invalid", "the model's endpoint is not an http(s) URL") from None
        entry.enter()
        try:
            if entry.pool is not None and self._direct:
                return await self._create_direct(body, entry, target)
            await _load_sdk()
            if entry.pool is None:
                return await self._create_with_sdk(body, self._client(target), target, entry, "/v1/messages")
            # The pooled client's base URL is the entry's: the absolute URL spares the SDK merging it on every call.
            return await self._create_with_sdk(
                body, self._pooled_client(target, entry), target, entry, entry.base_url + "/v1/messages"
            )
        finally:
            entry.leave()

    async def _create_direct(self, body: dict[str, Any], entry: _Upstream, target: Target) -> dict[str, Any]:
        ref = ATTEMPT_REF.get()
        # Lets a provider's (or the test fake's) billing records be matched to metered attempts.
        head = entry.head + b"x-bulkhead-attempt: %s\r\n" % ref.encode() if ref else entry.head
        assert entry.pool is not None, "the direct transport's entries have a pool"
        try:
            reply = await entry.pool.post(head, orjson.dumps(body))
        except upstream_http.UpstreamConnectError:
            # Not even connected: the upstream cannot have done any work, so a retry is safe.
            raise UpstreamError("unavailable", "upstream unreachable", retry_safe=True) from None
        except upstream_http.UpstreamTimeout:
            raise UpstreamError("unavailable", "upstream timed out") from None
        except upstream_http.UpstreamBroken:
            raise UpstreamError("unavailable", "upstream unreachable") from None
        if reply.status >= 300:
            raise _status_error(reply.status, _reply_error_message(reply), reply.headers, target)
        return _message(reply.body, reply.status)

    async def _create_with_sdk(
        self, body: dict[str, Any], client: anthropic.AsyncAnthropic, target: Target, entry: _Upstream, url: str
    ) -> dict[str, Any]:
        """The SDK's own POST of the Messages API, the body sent as the JSON bytes it already is.

        The SDK still builds the request (URL, key, version and client headers), sends it on its transport
        and raises its status errors; what this skips is messages.create walking the body through the SDK's
        parameter types on every call (a tenth to a fifth of a millisecond of CPU, more as the conversation
        grows), which changes nothing for a body that is plain JSON already (the proxy's, from the proto).
        The raw reply comes back as the upstream sent it: no models are built."""
        anthropic = _sdk()
        import httpx2  # the SDK's HTTP library: loaded with it

        ref = ATTEMPT_REF.get()
        # Lets a provider's (or the test fake's) billing records be matched to metered attempts.
        headers = {"x-bulkhead-attempt": ref} if ref else {}
        options = _post_options(entry, url).model_copy(update={"content": orjson.dumps(body), "headers": headers})
        try:
            reply = await client.request(httpx2.Response, options)
        except anthropic.AnthropicError as exc:
            raise _upstream_error(exc, target) from None
        return _message(reply.content, reply.status_code)

    async def stream(self, body: dict[str, Any], target: Target) -> AsyncIterator[dict[str, Any]]:
        """The streaming events of one call, as dicts: the upstream's JSON of each event as it sent it
        (read from the SDK's raw streaming response, no event models built), minus pings, as the SDK's
        own stream yields them."""
        await _load_sdk()
        anthropic = _sdk()
        started = False
        try:
            entry = self._upstream(target)
        except ValueError:  # an endpoint that is no http(s) URL (policy checks private models' URLs)
            raise UpstreamError("invalid", "the model's endpoint is not an http(s) URL") from None
        entry.enter()
        try:
            async with self._client(target).messages.with_streaming_response.create(
                **_sdk_kwargs(body), stream=True
            ) as response:
                http = response.http_response
                async for kind, data in _server_sent_events(http.aiter_lines()):
                    if kind == "ping":
                        continue
                    if kind == "error":  # what the SDK raises for it: a status error of the 200 reply
                        raise _status_error(
                            http.status_code, _sse_error_message(data, http.status_code), http.headers, target
                        )
                    started = True
                    yield orjson.loads(data)
        except UpstreamError as error:
            error.retry_safe = error.retry_safe and not started
            raise
        except anthropic.AnthropicError as exc:
            upstream = _upstream_error(exc, target)
            upstream.retry_safe = upstream.retry_safe and not started
            raise upstream from None
        except Exception as exc:  # noqa: BLE001 - the transport broke mid-stream (httpx errors are not wrapped)
            raise UpstreamError("unavailable", f"upstream stream broke: {type(exc).__name__}") from None
        finally:
            entry.leave()

    async def count_tokens(self, body: dict[str, Any], target: Target) -> int:
        """The upstream's input token count of a request."""
        await _load_sdk()
        anthropic = _sdk()
        body = {k: v for k, v in body.items() if k in ("model", "messages", "system", "tools", "tool_choice")}
        entry = self._upstream(target)
        entry.enter()
        try:
            return (await self._client(target).messages.count_tokens(**body)).input_tokens
        except anthropic.AnthropicError as exc:
            raise _upstream_error(exc, target) from None
        finally:
            entry.leave()

    async def close(self) -> None:
        """Close every client's connection pool."""
        for entry in self._clients.values():
            await _close_entry(entry)
        self._clients.clear()


def _message(content: bytes, status: int) -> dict[str, Any]:
    """The message of a successful reply's body, or UpstreamError when the body is no JSON message."""
    try:
        message = orjson.loads(content)
    except ValueError:
        raise UpstreamError("unavailable", "upstream sent a reply that is not JSON", status=status) from None
    if not isinstance(message, dict):
        raise UpstreamError("unavailable", "upstream sent a reply that is not a message", status=status)
    return message


def _upstream_error(exc: anthropic.AnthropicError, target: Target) -> UpstreamError:
    """Map an SDK error to UpstreamError, never echoing the key."""
    anthropic = _sdk()
    if isinstance(exc, anthropic.APIStatusError):
        return _status_error(exc.status_code, _error_message(exc), exc.response.headers, target)
    if isinstance(exc, anthropic.APITimeoutError):
        return UpstreamError("unavailable", "upstream timed out")
    if isinstance(exc, anthropic.APIConnectionError):
        # Not even connected: the upstream cannot have done any work, so a retry is safe.
        return UpstreamError("unavailable", "upstream unreachable", retry_safe=_never_connected(exc))
    return UpstreamError("unavailable", f"upstream call failed: {type(exc).__name__}")


def _never_connected(exc: BaseException) -> bool:
    """Whether an SDK connection error happened before any connection was made (so nothing was sent).

    Through the aiohttp transport every aiohttp connection error reaches the SDK as an httpx
    ConnectError, a connection the upstream dropped after reading the request included: only the
    aiohttp error under it (ClientConnectorError: the connect itself failed) tells. Through httpx
    the SDK's cause is httpx's own ConnectError (or ConnectTimeout) exactly when connecting failed."""
    aiohttp = sys.modules.get("aiohttp")
    cause = exc.__cause__
    for _ in range(8):
        if cause is None:
            break
        if aiohttp is not None and isinstance(cause, aiohttp.ClientError):
            return isinstance(cause, aiohttp.ClientConnectorError)
        cause = cause.__cause__
    return "connect" in type(exc.__cause__).__name__.lower()


def _status_error(status: int, message: str, headers: Any, target: Target) -> UpstreamError:
    """The UpstreamError of an HTTP error reply, never echoing the key."""
    detail = message.replace(target.api_key, "[redacted]") if target.api_key else message
    if status == 429:
        return UpstreamError(
            "rate_limited",
            f"upstream rate limit: {detail}",
            status=status,
            retry_after=_retry_after(headers),
            retry_safe=True,
        )
    if status in (401, 403):
        return UpstreamError("key_rejected", "the upstream rejected the provider key", status=status)
    if status >= 500:
        return UpstreamError(
            "unavailable",
            f"upstream error {status}: {detail}",
            status=status,
            retry_after=_retry_after(headers),
            retry_safe=True,
        )
    return UpstreamError("invalid", f"upstream refused the request: {detail}", status=status)


async def _server_sent_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """(event, data) of each server-sent event that names its event and carries data."""
    kind: str | None = None
    data: list[str] = []
    async for line in lines:
        if not line:
            if kind is not None and data:
                yield kind, "\n".join(data)
            kind, data = None, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            kind = value
        elif name == "data":
            data.append(value)
    if kind is not None and data:
        yield kind, "\n".join(data)


def _sse_error_message(data: str, status: int) -> str:
    """The message of a stream's error event (its error.message), as the SDK reports it."""
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    error: dict = body["error"] if isinstance(body, dict) and isinstance(body.get("error"), dict) else {}
    return str(error.get("message") or data or f"Error code: {status}")[:500]


def _reply_error_message(reply: upstream_http.UpstreamReply) -> str:
    """The error message of an error reply (the API's error.message), as the SDK would report it."""
    try:
        body = json.loads(reply.body)
    except ValueError:
        body = None
    error: dict = body["error"] if isinstance(body, dict) and isinstance(body.get("error"), dict) else {}
    message = error.get("message") or (
        reply.body.decode("utf-8", "replace") if reply.body else f"Error code: {reply.status}"
    )
    return str(message)[:500]


def _error_message(exc: anthropic.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    error: dict = body["error"] if isinstance(body.get("error"), dict) else {}
    return str(error.get("message") or exc.message)[:500]


def _retry_after(headers: Any) -> float | None:
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
        yield {
            "type": "message_start",
            "message": {
                **message,
                "content": [],
                "stop_reason": None,
                "usage": {**message["usage"], "output_tokens": 1},
            },
        }
        for index, block in enumerate(message["content"]):
            if block["type"] == "text":
                yield {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}
                for word in block["text"].split(" "):
                    yield {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "text_delta", "text": word + " "},
                    }
            else:
                yield {"type": "content_block_start", "index": index, "content_block": {**block, "input": {}}}
                yield {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": json.dumps(block["input"])},
                }
            yield {"type": "content_block_stop", "index": index}
        yield {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
            "usage": {"output_tokens": message["usage"]["output_tokens"]},
        }
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
            last = (
                content
                if isinstance(content, str)
                else " ".join(b.get("text", "") for b in content or () if b.get("type") == "text")
            )
            break
    words = f"[offline {body['model']}] {last}".split()[: max(1, body.get("max_tokens", 1))]
    choice = (body.get("tool_choice") or {}).get("type", "auto")
    tools = body.get("tools") or []
    tool = _next_tool(body, tools, choice)
    if tool is not None:
        content = [
            {
                "type": "tool_use",
                "id": "toolu_offline_" + _digest(body)[:12],
                "name": tool["name"],
                "input": _example_input(tool.get("input_schema") or {}),
            }
        ]
        stop = "tool_use"
    else:
        results = _tool_results(body)
        if results:  # an agent that used its tools reports what they returned
            words = f"[offline {body['model']}] done. {results[-1]}".split()[: max(1, body.get("max_tokens", 1))]
        content = [{"type": "text", "text": " ".join(words)}]
        stop = "end_turn" if len(words) < body.get("max_tokens", 1) else "max_tokens"
    return {
        "id": "msg_offline_" + _digest(body)[:20],
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {
            "input_tokens": max(1, _words([body.get("system"), body.get("messages"), body.get("tools")])),
            "output_tokens": max(1, _words(content)),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


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
    used = {
        b.get("name")
        for m in body.get("messages", [])
        if m.get("role") == "assistant" and isinstance(m.get("content"), list)
        for b in m["content"]
        if b.get("type") == "tool_use"
    }
    return next((t for t in tools if t["name"] not in used), None)


def _tool_results(body: dict[str, Any]) -> list[str]:
    """Text of every tool_result the conversation holds, oldest first."""
    out = []
    for m in body.get("messages", []):
        if m.get("role") == "user" and isinstance(m.get("content"), list):
            for b in m["content"]:
                if b.get("type") == "tool_result":
                    c = b.get("content")
                    out.append(
                        c if isinstance(c, str) else " ".join(x.get("text", "") for x in c or () if isinstance(x, dict))
                    )
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


def make_provider(config: InferenceConfig) -> Provider:
    """The provider the config names."""
    if config.provider == OFFLINE:
        return OfflineProvider()
    return AnthropicProvider(
        base_url=config.anthropic_base_url,
        timeout=config.upstream_timeout,
        direct=config.upstream_transport == "direct",
        pooled=config.upstream_transport == "sdk",
        http="httpx" if config.upstream_transport == "sdk-httpx" else "aiohttp",
    )

"""The upstream HTTP client: the SDK's stack with the cheap idle-connection probe, and its fallbacks."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx2
import orjson
import pytest

from services.inference import providers
from services.inference.providers import AnthropicProvider, Target
from services.inference.upstream_http import (
    ProbedTransport,
    _readable,
    make_http_client,
)
from testkit.fake_anthropic import FakeAnthropic

from .helpers import PINNED, PLATFORM_KEY

_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


@pytest.fixture
def no_proxy_env(monkeypatch):
    """No HTTP proxy configured in the environment."""
    for name in _PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


@contextlib.asynccontextmanager
async def _provider_on(handler: Any, **ways: Any) -> AsyncIterator[AnthropicProvider]:
    """A provider whose upstream is handler, served by a raw asyncio server on loopback; both closed after."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    base_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    provider = AnthropicProvider(base_url=base_url, timeout=5.0, **ways)
    try:
        yield provider
    finally:
        await provider.close()
        server.close()
        await server.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> None:
    """Read one whole request (head and content-length body)."""
    lines = (await reader.readuntil(b"\r\n\r\n")).lower().split(b"\r\n")
    await reader.readexactly(next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length")))


def test_probe_reports_data_or_close_on_an_idle_socket():
    """Readable (a server close or stray bytes) means expired; a quiet socket is fine; a closed one is expired."""
    ours, theirs = socket.socketpair()
    try:
        assert _readable(ours) is False
        theirs.close()
        assert _readable(ours) is True
    finally:
        ours.close()
    assert _readable(ours) is True  # fileno() is -1 once closed
    assert _readable(None) is True


async def test_sdk_calls_open_connections_through_the_probed_backend():
    """Two calls through the official SDK reuse one kept-alive connection that the probed backend opened."""
    transport = ProbedTransport(limits=anthropic.DEFAULT_CONNECTION_LIMITS)
    async with FakeAnthropic() as fake:
        client = anthropic.AsyncAnthropic(
            base_url=fake.base_url,
            api_key=PLATFORM_KEY,
            max_retries=0,
            http_client=anthropic.DefaultAsyncHttpxClient(transport=transport),
        )
        for _ in range(2):
            reply = await client.messages.create(
                model=PINNED, max_tokens=20, messages=[{"role": "user", "content": "hello there"}]
            )
            assert reply.content[0].text
        await client.close()
    assert transport.backend.connections == 1


async def test_an_idle_connection_the_server_closed_is_replaced_not_reused():
    """The server closes a kept-alive connection; the next request opens a new one instead of failing."""
    closed = asyncio.Event()

    async def serve_once_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: keep-alive\r\n\r\nok")
        await writer.drain()
        writer.close()  # idle keep-alive connection dropped by the server
        await writer.wait_closed()
        closed.set()

    server = await asyncio.start_server(serve_once_then_close, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    transport = ProbedTransport()
    try:
        async with httpx2.AsyncClient(transport=transport) as client:
            assert (await client.get(url)).text == "ok"
            await asyncio.wait_for(closed.wait(), 5)
            await asyncio.sleep(0.05)  # the FIN reaches the client's socket
            closed.clear()
            assert (await client.get(url)).text == "ok"
    finally:
        server.close()
        await server.wait_closed()
    assert transport.backend.connections == 2


def test_an_http_proxy_in_the_environment_keeps_the_sdk_default_client(monkeypatch, no_proxy_env):
    """Only the SDK's own transports route through HTTP(S)_PROXY, so with one set the stock client is used."""
    assert isinstance(make_http_client(timeout=5.0), httpx2.AsyncClient)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    assert make_http_client(timeout=5.0) is None


async def test_provider_builds_one_probed_client_per_key(monkeypatch, no_proxy_env):
    """Each provider key gets its own SDK client with its own probed HTTP client; a key's client is reused."""
    made: list[httpx2.AsyncClient | None] = []

    def spy(*, timeout: float, transport: str) -> httpx2.AsyncClient | None:
        made.append(make_http_client(timeout=timeout, transport=transport))
        return made[-1]

    monkeypatch.setattr(providers, "make_http_client", spy)
    async with FakeAnthropic() as fake:
        provider = AnthropicProvider(base_url=fake.base_url, timeout=5.0, http="httpx")
        body = {"model": PINNED, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
        for key in ("sk-a", "sk-b", "sk-a"):
            assert (await provider.create(body, Target(api_key=key)))["type"] == "message"
        await provider.close()
    assert len(made) == 2 and all(isinstance(c, httpx2.AsyncClient) for c in made)
    assert all(isinstance(c._transport, ProbedTransport) for c in made)
    assert [c.api_key for c in fake.usage_log] == ["sk-a", "sk-b", "sk-a"]


async def test_the_default_transport_is_the_sdks_aiohttp_one(no_proxy_env):
    """By default the SDK sends through its own aiohttp transport (anthropic.DefaultAioHttpClient): unary
    calls, streams and token counts all work through it, one kept-alive connection reused."""
    async with FakeAnthropic() as fake:
        provider = AnthropicProvider(base_url=fake.base_url, timeout=5.0)
        target = Target(api_key=PLATFORM_KEY)
        body = {"model": PINNED, "max_tokens": 20, "messages": [{"role": "user", "content": "hello there"}]}
        for _ in range(2):
            assert (await provider.create(body, target))["content"][0]["text"]
        events = [e["type"] async for e in provider.stream(body, target)]
        assert events[0] == "message_start" and events[-1] == "message_stop"
        assert await provider.count_tokens(body, target) == 2
        http = provider._upstream(target).http
        assert isinstance(http, anthropic.DefaultAioHttpClient)
        session = http._transport.client
        await provider.close()
    assert session.closed
    assert [c.api_key for c in fake.usage_log] == [PLATFORM_KEY] * 3


async def test_an_evicted_client_closes_once_its_last_call_ended(no_proxy_env):
    """A key's client pushed out of the provider's bounded set keeps serving the call that uses it and is
    closed when that call ends (an aiohttp session must be closed, not collected)."""
    async with FakeAnthropic(delay=0.3) as fake:
        provider = AnthropicProvider(base_url=fake.base_url, timeout=5.0, max_clients=1)
        body = {"model": PINNED, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
        slow = asyncio.create_task(provider.create(body, Target(api_key="sk-a")))
        await asyncio.sleep(0.1)
        first = provider._upstream(Target(api_key="sk-a"))
        assert first.in_flight == 1
        other = asyncio.create_task(provider.create(body, Target(api_key="sk-b")))  # evicts sk-a's entry
        await asyncio.sleep(0.05)
        assert first.evicted and not first.http.is_closed and not slow.done()
        assert (await slow)["type"] == "message"  # the call it carried finished
        assert (await other)["type"] == "message"
        for _ in range(50):
            if first.http.is_closed:
                break
            await asyncio.sleep(0.01)
        assert first.http.is_closed
        await provider.close()


async def test_through_aiohttp_only_a_failed_connect_is_retry_safe(no_proxy_env):
    """aiohttp's connection errors all reach the SDK as ConnectError: a port nobody listens on (nothing was
    sent) is retry-safe, a connection the upstream drops after reading the request (it may have done the
    work) is not."""
    from services.inference.providers import UpstreamError

    body = {"model": PINNED, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # a free port: connecting is refused
    provider = AnthropicProvider(base_url=f"http://127.0.0.1:{port}", timeout=5.0)
    with pytest.raises(UpstreamError) as refused:
        await provider.create(body, Target(api_key=PLATFORM_KEY))
    await provider.close()
    assert (refused.value.kind, refused.value.retry_safe) == ("unavailable", True)

    async def read_then_drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()

    async with _provider_on(read_then_drop) as provider:
        with pytest.raises(UpstreamError) as dropped:
            await provider.create(body, Target(api_key=PLATFORM_KEY))
    assert (dropped.value.kind, dropped.value.retry_safe, dropped.value.status) == ("unavailable", False, 0)
    assert provider._http == "aiohttp"  # the transport these errors came through


WAYS = {"sdk-aiohttp": {}, "sdk-pooled": {"pooled": True}, "direct": {"direct": True}}
"""The provider's ways of making a unary call (AnthropicProvider keyword arguments)."""


@pytest.mark.parametrize("way", WAYS)
async def test_the_request_body_goes_upstream_as_given_with_the_sdks_headers(no_proxy_env, way):
    """A unary call sends the body field for field (one the SDK has no keyword for included) with the key, the
    API version and the attempt reference as headers, on the SDK path as on the direct one."""
    body = {
        "model": PINNED,
        "max_tokens": 20,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "top_k": 3,
        "metadata": {"user_id": "bh_opaque"},
    }
    async with FakeAnthropic() as fake:
        provider = AnthropicProvider(base_url=fake.base_url, timeout=5.0, **WAYS[way])
        token = providers.ATTEMPT_REF.set("att-1")
        try:
            assert (await provider.create(body, Target(api_key=PLATFORM_KEY)))["type"] == "message"
        finally:
            providers.ATTEMPT_REF.reset(token)
            await provider.close()
    (call,) = fake.calls
    assert (call.method, call.path, call.body) == ("POST", "/v1/messages", body)
    headers = {k.lower(): v for k, v in call.headers.items()}
    assert headers["anthropic-version"] == providers.API_VERSION
    assert PLATFORM_KEY in (headers.get("x-api-key", ""), headers.get("authorization", "").removeprefix("Bearer "))
    assert headers["x-bulkhead-attempt"] == "att-1"


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("reply", [b"not json", b"[1, 2]"], ids=["not-json", "not-a-message"])
async def test_a_successful_reply_that_is_no_message_is_an_upstream_failure(no_proxy_env, way, reply):
    """A 200 whose body is no JSON object is the upstream's fault (unavailable), named as such, on both paths."""
    from services.inference.providers import UpstreamError

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(reply), reply))
        await writer.drain()

    body = {"model": PINNED, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    async with _provider_on(answer, **WAYS[way]) as provider:
        with pytest.raises(UpstreamError) as failed:
            await provider.create(body, Target(api_key=PLATFORM_KEY))
    assert (failed.value.kind, failed.value.status) == ("unavailable", 200)
    assert "not JSON" in failed.value.message or "not a message" in failed.value.message


async def test_through_the_pool_the_sdks_errors_and_retry_safety_hold(no_proxy_env):
    """The SDK on the pool: a refused connect is retry-safe, a connection dropped after the request was read
    is not, an HTTP error reply is the SDK's status error (its retry-after read), a gzip reply is decoded."""
    import gzip

    from services.inference.providers import UpstreamError

    body = {"model": PINNED, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    provider = AnthropicProvider(base_url=f"http://127.0.0.1:{port}", timeout=5.0, pooled=True)
    with pytest.raises(UpstreamError) as refused:
        await provider.create(body, Target(api_key=PLATFORM_KEY))
    await provider.close()
    assert (refused.value.kind, refused.value.retry_safe) == ("unavailable", True)

    replies = [
        None,  # drop the connection once the request is read
        b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\ncontent-length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n%s"
        % (len(gzip.compress(b'{"type": "message"}')), gzip.compress(b'{"type": "message"}')),
    ]

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        reply = replies.pop(0)
        if reply is None:
            writer.transport.abort()
            return
        writer.write(reply)
        await writer.drain()
        writer.close()

    async with _provider_on(answer, pooled=True) as provider:
        with pytest.raises(UpstreamError) as dropped:
            await provider.create(body, Target(api_key=PLATFORM_KEY))
        with pytest.raises(UpstreamError) as limited:
            await provider.create(body, Target(api_key=PLATFORM_KEY))
        assert await provider.create(body, Target(api_key=PLATFORM_KEY)) == {"type": "message"}
    assert (dropped.value.kind, dropped.value.retry_safe, dropped.value.status) == ("unavailable", False, 0)
    assert (limited.value.kind, limited.value.status, limited.value.retry_after) == ("rate_limited", 429, 7.0)


async def test_the_pool_transport_serves_only_its_own_origin():
    """A request for any other origin (a redirect's, another base URL's) is refused before a byte is sent."""
    from services.inference.sdk_http import PoolTransport
    from services.inference.upstream_http import UpstreamPool

    pool = UpstreamPool("http://127.0.0.1:9", timeout=1.0)
    transport = PoolTransport(pool, "http://127.0.0.1:9")
    for url in ("http://127.0.0.1:10/v1/messages", "https://127.0.0.1:9/v1/messages", "http://evil.test:9/v1"):
        with pytest.raises(httpx2.UnsupportedProtocol):
            await transport.handle_async_request(httpx2.Request("POST", url, content=b"{}"))
    assert pool.connections == 0
    await transport.aclose()


async def test_an_evicted_pooled_client_closes_its_pool_once_its_last_call_ended(no_proxy_env):
    """Evicting a key's entry while its pooled SDK call runs: the call finishes, then the pool's connections close."""
    async with FakeAnthropic(delay=0.3) as fake:
        provider = AnthropicProvider(base_url=fake.base_url, timeout=5.0, max_clients=1, pooled=True)
        body = {"model": PINNED, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
        slow = asyncio.create_task(provider.create(body, Target(api_key="sk-a")))
        await asyncio.sleep(0.1)
        first = provider._upstream(Target(api_key="sk-a"))
        other = asyncio.create_task(provider.create(body, Target(api_key="sk-b")))  # evicts sk-a's entry
        await asyncio.sleep(0.05)
        assert first.evicted and not slow.done()
        assert (await slow)["type"] == "message"
        assert (await other)["type"] == "message"
        for _ in range(50):
            if first.pooled_sdk is not None and first.pooled_sdk.is_closed():
                break
            await asyncio.sleep(0.01)
        assert first.pooled_sdk is not None and first.pooled_sdk.is_closed()
        assert not first.pool._idle  # its kept-alive connection was closed with it
        await provider.close()
    assert [c.api_key for c in fake.usage_log] == ["sk-a", "sk-b"]


class _RecordingPool:
    """An UpstreamPool stand-in that records each request and answers with the next scripted reply."""

    def __init__(self, replies: list[Any]):
        self.replies = replies
        self.sent: list[tuple[bytes, bytes]] = []

    async def post(self, head: bytes, body: bytes) -> Any:
        self.sent.append((head, body))
        return self.replies.pop(0)

    async def close(self) -> None:
        pass


async def test_the_lean_pool_client_sends_and_reads_what_httpxs_own_client_does():
    """PoolClient (httpx's build_request and send cut short for the SDK's calls) puts the same request on the pool
    as httpx's own client on PoolTransport, hands the SDK the same reply (a status error's included), and keeps
    and sends back an upstream's cookies as httpx does."""
    from services.inference.sdk_http import PoolClient, PoolTransport
    from services.inference.upstream_http import UpstreamReply

    base_url = "http://127.0.0.1:9/prefix"
    seen: dict[str, Any] = {}
    for name in ("httpx", "lean"):
        pool = _RecordingPool(
            [
                UpstreamReply(200, {"content-type": "application/json", "set-cookie": "k=v; Path=/"}, b'{"a": 1}'),
                UpstreamReply(200, {"content-type": "application/json", "request-id": "r1"}, b'{"b": 2}'),
                UpstreamReply(429, {"retry-after": "3", "content-type": "application/json"}, b'{"error": {}}'),
            ]
        )
        transport = PoolTransport(pool, base_url)  # type: ignore[arg-type]  # the pool's post is all it uses
        http = (
            PoolClient(transport, timeout=5.0)
            if name == "lean"
            else httpx2.AsyncClient(transport=transport, timeout=5.0, follow_redirects=False)
        )
        client = anthropic.AsyncAnthropic(api_key="sk-x", base_url=base_url, max_retries=0, http_client=http)
        replies = []
        for url in (base_url + "/v1/messages", "/v1/messages"):
            reply = await client.post(
                url, cast_to=httpx2.Response, content=b'{"m": 1}', options={"headers": {"x-bulkhead-attempt": "a"}}
            )
            replies.append((reply.status_code, dict(reply.headers), reply.content, reply.request.url))
        with pytest.raises(anthropic.RateLimitError) as limited:
            await client.post(url, cast_to=httpx2.Response, content=b"{}")
        await client.close()
        assert http.is_closed
        seen[name] = (pool.sent, replies, limited.value.status_code, dict(limited.value.response.headers))
    assert seen["lean"] == seen["httpx"]  # byte for byte, header order included
    (first, body), (second, _), _ = seen["lean"][0]
    assert first.startswith(b"POST /prefix/v1/messages HTTP/1.1\r\n") and body == b'{"m": 1}'
    assert b"\r\nCookie: k=v\r\n" in second and b"Cookie" not in first  # the upstream's cookie sent back


async def test_the_sdk_path_sends_each_call_what_the_sdks_own_post_sends(no_proxy_env):
    """The SDK's request options are built once per key and endpoint (providers._post_options) and copied per call:
    each call still sends its own body and attempt reference, and otherwise the very bytes the SDK's own
    client.post sends; the options kept are never changed by a call."""
    from services.inference.sdk_http import PoolClient, PoolTransport
    from services.inference.upstream_http import UpstreamReply

    base_url = "http://upstream.test:8080"
    json = {"content-type": "application/json"}
    replies = [UpstreamReply(200, json, b'{"type": "message", "n": %d}' % i) for i in (1, 2)]
    provider = AnthropicProvider(base_url=base_url, timeout=5.0, pooled=True)
    target = Target(api_key=PLATFORM_KEY)
    entry = provider._upstream(target)
    entry.pool = pool = _RecordingPool(list(replies))  # type: ignore[assignment]  # its post is all that is used
    bodies = [{"model": PINNED, "max_tokens": n, "messages": [{"role": "user", "content": "hi"}]} for n in (1, 2)]
    got = []
    for n, body in enumerate(bodies, 1):
        token = providers.ATTEMPT_REF.set(f"att-{n}")
        try:
            got.append(await provider.create(body, target))
        finally:
            providers.ATTEMPT_REF.reset(token)
    assert [m["n"] for m in got] == [1, 2]
    assert entry.post_options.content is None and entry.post_options.headers == {}

    reference = _RecordingPool(list(replies))
    client = anthropic.AsyncAnthropic(
        api_key=PLATFORM_KEY,
        base_url=base_url,
        max_retries=0,
        timeout=5.0,
        http_client=PoolClient(PoolTransport(reference, base_url), timeout=5.0),  # type: ignore[arg-type]
        open_telemetry=False,
    )
    for n, body in enumerate(bodies, 1):
        await client.post(
            base_url + "/v1/messages",
            cast_to=httpx2.Response,
            content=orjson.dumps(body),
            options={"headers": {"x-bulkhead-attempt": f"att-{n}"}, "max_retries": 0},
        )
    await client.close()
    await provider.close()
    assert pool.sent == reference.sent  # byte for byte, header order included
    assert [orjson.loads(body) for _, body in pool.sent] == bodies
    assert [b"x-bulkhead-attempt: att-%d\r\n" % n in head for n, (head, _) in enumerate(pool.sent, 1)] == [True, True]

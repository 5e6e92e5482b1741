"""The lean unary upstream client (upstream_http.UpstreamPool) behind AnthropicProvider.create."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
from typing import Self

import pytest

from services.inference import providers
from services.inference.providers import AnthropicProvider, Target, UpstreamError
from services.inference.upstream_http import UpstreamPool

BODY = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
REPLY = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "m",
    "content": [],
    "usage": {"input_tokens": 1, "output_tokens": 1},
}


class Upstream:
    """A loopback HTTP server answering each request with the next scripted raw reply (bytes)."""

    def __init__(self, *replies: bytes):
        self.replies = list(replies)
        self.requests: list[bytes] = []
        self.connections = 0

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.replies:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(
                    next(
                        line.split(b":")[1]
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    )
                )
                self.requests.append(head + await reader.readexactly(length))
                reply = self.replies.pop(0)
                if reply == b"":  # drop the connection without answering
                    break
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _json_reply(payload: dict, status: str = "200 OK", extra: str = "") -> bytes:
    data = json.dumps(payload).encode()
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n{extra}\r\n".encode()
        + data
    )


def _chunked_gzip_reply(payload: dict) -> bytes:
    data = gzip.compress(json.dumps(payload).encode())
    half = len(data) // 2
    chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(part), part) for part in (data[:half], data[half:]))
    return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-encoding: gzip\r\n\r\n" + chunks + b"0\r\n\r\n"


def test_unary_calls_send_the_api_version_the_sdk_sends():
    """The hand-written request carries the anthropic-version of the SDK that streams and counts tokens."""
    import anthropic._constants

    assert providers.API_VERSION == anthropic._constants.ANTHROPIC_API_VERSION


async def test_replies_by_length_and_chunked_gzip_reuse_one_connection():
    """A content-length reply then a chunked, gzipped one: both read whole, over one kept-alive connection."""
    async with Upstream(_json_reply(REPLY), _chunked_gzip_reply({**REPLY, "id": "msg_2"})) as up:
        provider = AnthropicProvider(base_url=up.url + "/prefix/", timeout=5.0, direct=True)
        assert (await provider.create(BODY, Target(api_key="sk-a")))["id"] == "msg_1"
        assert (await provider.create(BODY, Target(api_key="sk-a")))["id"] == "msg_2"
        await provider.close()
    assert up.connections == 1
    head, _, body = up.requests[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /prefix/v1/messages HTTP/1.1\r\n")
    assert b"\r\nauthorization: Bearer sk-a\r\n" in head and json.loads(body) == BODY


async def test_each_key_gets_its_own_connections():
    """Two provider keys never share a connection (nor a pool)."""
    async with Upstream(*[_json_reply(REPLY)] * 3) as up:
        provider = AnthropicProvider(base_url=up.url, timeout=5.0, direct=True)
        for key in ("sk-a", "sk-b", "sk-a"):
            await provider.create(BODY, Target(api_key=key))
        await provider.close()
    assert up.connections == 2
    keys = [next(line for line in r.split(b"\r\n") if line.startswith(b"authorization")) for r in up.requests]
    assert keys == [b"authorization: Bearer sk-a", b"authorization: Bearer sk-b", b"authorization: Bearer sk-a"]


async def test_error_replies_map_like_the_sdk_errors_and_never_echo_the_key():
    """429 with retry-after is retry-safe rate limiting; 400 is invalid with the API's message, the key redacted."""
    error = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad key sk-secret here"}}
    async with Upstream(
        _json_reply(error, "429 Too Many Requests", "retry-after: 2\r\n"), _json_reply(error, "400 Bad Request")
    ) as up:
        provider = AnthropicProvider(base_url=up.url, timeout=5.0, direct=True)
        with pytest.raises(UpstreamError) as limited:
            await provider.create(BODY, Target(api_key="sk-secret"))
        with pytest.raises(UpstreamError) as invalid:
            await provider.create(BODY, Target(api_key="sk-secret"))
        await provider.close()
    assert (limited.value.kind, limited.value.retry_after, limited.value.retry_safe) == ("rate_limited", 2.0, True)
    assert invalid.value.kind == "invalid" and "[redacted]" in invalid.value.message
    assert "sk-secret" not in invalid.value.message and not invalid.value.retry_safe


async def test_a_refused_connection_is_retry_safe_a_dropped_one_is_not():
    """Nothing listening: never sent, so safe to retry. Dropped after the request: maybe billed, not retried."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    provider = AnthropicProvider(base_url=f"http://127.0.0.1:{closed_port}", timeout=5.0, direct=True)
    with pytest.raises(UpstreamError) as refused:
        await provider.create(BODY, Target(api_key="sk-a"))
    assert refused.value.retry_safe and refused.value.status == 0
    async with Upstream(b"") as up:
        provider = AnthropicProvider(base_url=up.url, timeout=5.0, direct=True)
        with pytest.raises(UpstreamError) as dropped:
            await provider.create(BODY, Target(api_key="sk-a"))
        await provider.close()
    assert not dropped.value.retry_safe and dropped.value.status == 0 and len(up.requests) == 1


async def test_a_silent_upstream_times_out_and_its_connection_is_not_reused():
    """No answer within the timeout: unavailable (not retry-safe); the next call opens a new connection."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await asyncio.sleep(5)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    pool = UpstreamPool(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", timeout=0.2)
    provider = AnthropicProvider(base_url="http://unused.invalid", timeout=0.2, direct=True)
    try:
        for _ in range(2):
            with pytest.raises(Exception) as timed_out:
                await pool.post(pool.request_head("/v1/messages"), b"{}")
            assert type(timed_out.value).__name__ == "UpstreamTimeout"
            assert not pool._idle  # a timed-out connection is never offered for reuse
        # Each call opened its own (one fewer if a loaded machine timed a call out while connecting).
        assert pool.connections in (1, 2)
        with pytest.raises(UpstreamError) as raised:
            await provider.create(
                BODY, Target(api_key="sk-a", base_url=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
            )
        assert raised.value.message == "upstream timed out" and not raised.value.retry_safe
    finally:
        await pool.close()
        await provider.close()
        server.close()


async def test_a_key_with_a_line_break_is_refused_before_anything_is_sent():
    """A tenant's stored key cannot add header lines to the upstream request."""
    async with Upstream(_json_reply(REPLY)) as up:
        provider = AnthropicProvider(base_url=up.url, timeout=5.0, direct=True)
        with pytest.raises(UpstreamError) as refused:
            await provider.create(BODY, Target(api_key="sk-a\r\nx-evil: 1"))
        await provider.close()
    assert refused.value.kind == "key_rejected" and up.requests == []


def test_an_idle_proxy_has_not_imported_the_sdk_nor_httpx():
    """The proxy's modules load neither the anthropic SDK (about 50 MB) nor httpx (3.6 MB): unary calls need
    neither, the rest loads them on first use."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from services.inference.server import start\n"
        "from services.inference.providers import AnthropicProvider\n"
        "print(sorted(m for m in ('anthropic', 'httpx2', 'httpcore2') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

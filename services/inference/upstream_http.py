"""The proxy's HTTP clients to the upstream: a lean HTTP/1.1 pool for unary calls, and the SDK's stack.

UpstreamPool (unary Messages calls, the hot path) writes the request and parses the reply itself
over kept-alive asyncio connections: a few tens of microseconds of CPU per call, where the SDK's
stack (request models, httpx, httpcore, h11, anyio) spent about 0.9 ms. It speaks just what the
Messages API needs: one POST with a JSON body, a reply with content-length or chunked, gzip or
identity; TLS with the same trust store as httpx; no HTTP proxy (with one configured, the SDK
serves every call, see proxies_configured).

make_http_client is the SDK's HTTP client (streams, token counts) with a cheap idle probe (sdk_http,
imported on first use):

Before it sends a request (and again when a response is closed), httpx's connection pool asks
every idle keep-alive connection whether the server has closed it. The stock answer goes through
anyio's typed attributes, about 20 µs per connection; with 30 idle connections at concurrency 32
that was a third of the proxy's CPU. ProbedBackend gives the same answer (one poll() on the
connection's socket) with the socket looked up once, at connect. Everything else (TLS, timeouts,
limits, exceptions) is httpx's and httpcore's, unchanged. No grpc imports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import ssl
import urllib.parse
import urllib.request
import zlib
from collections import deque
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import httpx2

_SDK_HTTP = ("ProbedTransport", "ProbedBackend", "CONNECTION_LIMITS")
"""What sdk_http defines, importable from here too (loaded on first use: httpx is 3.6 MB an idle proxy
does not need)."""


def __getattr__(name: str) -> Any:
    if name in _SDK_HTTP:
        from services.inference import sdk_http

        return getattr(sdk_http, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


log = logging.getLogger("bulkhead.inference.upstream")


def _keepalive_options() -> list[tuple[int, int, int]]:
    """TCP keep-alive as the SDK's default client sets it (a dead upstream is noticed in minutes)."""
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPINTVL", 60), ("TCP_KEEPCNT", 5), ("TCP_KEEPIDLE", 60)):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return options


def _readable(sock: socket.socket | None) -> bool:
    """httpcore's probe: an idle connection whose socket is readable is one the server closed."""
    fd = sock.fileno() if sock is not None else -1
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def proxies_configured() -> bool:
    """Whether an HTTP(S) proxy is configured in the environment (only the SDK's own transports honour it)."""
    return any(k in ("http", "https", "all") for k in urllib.request.getproxies())


def aiohttp_available() -> bool:
    """Whether the SDK's aiohttp transport can be used (the `anthropic[aiohttp]` extra is installed)."""
    import importlib.util

    return importlib.util.find_spec("aiohttp") is not None


def make_http_client(*, timeout: float, transport: str = "httpx") -> httpx2.AsyncClient | None:
    """The HTTP client the SDK client of one key and endpoint sends through.

    transport "aiohttp": the SDK's own aiohttp transport (anthropic.DefaultAioHttpClient, the
    `anthropic[aiohttp]` extra): about half the CPU per call of its httpx stack, and it honours an
    HTTP proxy in the environment itself. "httpx": the SDK's default httpx client with
    ProbedTransport, built as anthropic.DefaultAsyncHttpxClient builds its own (limits, redirects,
    keep-alive), without importing the SDK; None (the SDK's own) when an HTTP proxy is configured."""
    if transport == "aiohttp":
        from services.inference.sdk_http import CONNECTION_LIMITS
        from services.inference.sdk_import import anthropic_sdk

        return anthropic_sdk().DefaultAioHttpClient(timeout=timeout, limits=CONNECTION_LIMITS)
    if proxies_configured():
        return None  # the SDK routes through the proxy only with the transports it builds itself
    import httpx2

    from services.inference.sdk_http import CONNECTION_LIMITS, ProbedTransport

    try:
        transport_ = ProbedTransport(limits=CONNECTION_LIMITS, socket_options=_keepalive_options())
    except AttributeError:  # an httpx without the pool this hooks into: the stock client still works
        log.warning("httpx changed: upstream calls use the stock connection probe")
        return None
    return httpx2.AsyncClient(
        transport=transport_, timeout=httpx2.Timeout(timeout), limits=CONNECTION_LIMITS, follow_redirects=True
    )


# ----- the lean unary client -----


def header_safe(value: str) -> bool:
    """Whether value can be sent as one header value as is: visible ASCII and spaces, no CR or LF."""
    return value.isascii() and value.isprintable()


class UpstreamConnectError(Exception):
    """No connection could be made: the request was never sent (a retry is safe)."""


class UpstreamTimeout(Exception):
    """The upstream did not answer in time (it may have done the work)."""


class UpstreamBroken(Exception):
    """The connection broke after the request was (maybe) sent, before a whole reply came back."""


class UpstreamReply:
    """A whole HTTP reply: status, headers (lower-case names; the last of repeats) and the decoded body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body


_MAX_HEAD = 64 * 1024
_MAX_BODY = 64 * 1024 * 1024


class _Connection(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection; one request at a time."""

    transport: asyncio.Transport  # set by connection_made, before loop.create_connection returns

    def __init__(self) -> None:
        self.closed = False
        self._buf = bytearray()
        self._waiter: asyncio.Future | None = None
        self._head: tuple | None = None  # (status, headers) of the reply being read
        self._length = -1  # content-length; -1 chunked, -2 until close
        self._chunks = bytearray()
        self.reusable = True
        self.sock: socket.socket | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream connection's
        self.sock = transport.get_extra_info("socket")

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._waiter is not None:
            try:
                self._parse()
            except Exception as exc:  # noqa: BLE001 - a reply we cannot read: the connection is done
                self._fail(UpstreamBroken(f"unreadable reply: {exc}"))
        elif self._buf:  # bytes on an idle connection: its state is unknown, drop it
            self.reusable = False
            self.transport.close()

    def eof_received(self) -> bool:
        self.reusable = False
        if self._waiter is not None and self._head is not None and self._length == -2:
            self._finish(bytes(self._buf))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        if exc is None and self._waiter is not None and self._head is not None and self._length == -2:
            self._finish(bytes(self._buf))  # a reply that ends with the connection (no eof_received over TLS)
        self._fail(UpstreamBroken("the upstream closed the connection"))

    # one exchange
    def request(self, data: bytes) -> asyncio.Future:
        """Send one request; the future gets its UpstreamReply."""
        self._waiter = asyncio.get_running_loop().create_future()
        self._head = None
        self.transport.write(data)
        return self._waiter

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _finish(self, body: bytes) -> None:
        if self._head is None:  # every caller has read the head first
            raise UpstreamBroken("a reply body before its head")
        status, headers = self._head
        waiter, self._waiter = self._waiter, None
        if headers.get("content-encoding", "identity") not in ("identity", ""):
            body = _decode(body, headers["content-encoding"])
        if waiter is not None and not waiter.done():
            waiter.set_result(UpstreamReply(status, headers, body))

    def _parse(self) -> None:
        buf = self._buf
        if self._head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    raise ValueError("header too long")
                return
            lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
            del buf[: end + 4]
            version, _, rest = lines[0].partition(" ")
            status = int(rest[:3])
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if 100 <= status < 200:  # an interim reply: the real one follows
                self._parse()
                return
            self._head = (status, headers)
            if headers.get("connection", "").lower() == "close" or version == "HTTP/1.0":
                self.reusable = False
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self._length, self._chunks = -1, bytearray()
            elif "content-length" in headers:
                self._length = int(headers["content-length"])
            else:
                self._length = -2
                self.reusable = False
        if self._length >= 0:
            if len(buf) >= self._length:
                body = bytes(buf[: self._length])
                del buf[: self._length]
                if buf:
                    self.reusable = False
                self._finish(body)
        elif self._length == -1:
            self._parse_chunks()
        elif len(buf) > _MAX_BODY:
            raise ValueError("reply too long")

    def _parse_chunks(self) -> None:
        buf = self._buf
        while True:
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                return
            size = int(bytes(buf[:line_end]).split(b";", 1)[0], 16)
            if size == 0:
                trailer_end = buf.find(b"\r\n\r\n", line_end)
                if trailer_end < 0 and not buf.startswith(b"\r\n", line_end + 2):
                    return
                done = trailer_end + 4 if trailer_end >= 0 else line_end + 4
                del buf[:done]
                if buf:
                    self.reusable = False
                self._finish(bytes(self._chunks))
                return
            if len(buf) < line_end + 2 + size + 2:
                return
            self._chunks += buf[line_end + 2 : line_end + 2 + size]
            if len(self._chunks) > _MAX_BODY:
                raise ValueError("reply too long")
            del buf[: line_end + 2 + size + 2]


def _decode(body: bytes, encoding: str) -> bytes:
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompress(body, 16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        try:
            return zlib.decompress(body)
        except zlib.error:
            return zlib.decompress(body, -zlib.MAX_WBITS)
    raise ValueError(f"unsupported content-encoding {encoding!r}")


class UpstreamPool:
    """Kept-alive HTTP/1.1 connections to one upstream origin, for one provider key (never shared across keys)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float,
        connect_timeout: float | None = None,
        max_idle: int = 100,
        max_connections: int = 1000,
    ):
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._tls = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port or (443 if self._tls else 80)
        default_port = self._port == (443 if self._tls else 80)
        self._host_header = (f"[{self._host}]" if ":" in self._host else self._host) + (
            "" if default_port else f":{self._port}"
        )
        self._prefix = url.path.rstrip("/")
        self._timeout = timeout
        self._connect_timeout = connect_timeout if connect_timeout is not None else timeout
        self._max_idle = max_idle
        self._max_connections = max_connections
        self._idle: deque[_Connection] = deque()
        self._open = 0
        self._slots: deque[asyncio.Future] = deque()
        self._ssl: ssl.SSLContext | None = None
        self.connections = 0
        """Connections opened (tests check reuse)."""

    def request_head(self, path: str) -> bytes:
        """The start of a POST to path (request line and host); the caller adds its headers."""
        return f"POST {self._prefix}{path} HTTP/1.1\r\nhost: {self._host_header}\r\n".encode("latin-1")

    async def post(self, head: bytes, body: bytes) -> UpstreamReply:
        """Send head (from request_head plus header lines, each ending CRLF) and body; the whole reply."""
        data = b"%scontent-length: %d\r\n\r\n%s" % (head, len(body), body)
        conn = await self._acquire()
        loop = asyncio.get_running_loop()
        waiter = conn.request(data)
        timer = loop.call_later(self._timeout, _expire, conn, waiter)
        try:
            reply = await waiter
        except BaseException:
            conn.reusable = False
            conn.transport.abort()
            self._release(conn)
            raise
        finally:
            timer.cancel()
        self._release(conn)
        return reply

    async def _acquire(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            # The loop may not have seen the server's close of an idle connection yet: ask the socket.
            if not conn.closed and conn.reusable and not _readable(conn.sock):
                return conn
            self._open -= 1
            conn.transport.close()
        while self._open >= self._max_connections:
            slot = asyncio.get_running_loop().create_future()
            self._slots.append(slot)
            await slot
            if self._idle:
                return await self._acquire()
        self._open += 1
        try:
            return await self._connect()
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        ctx = None
        if self._tls:
            if self._ssl is None:
                self._ssl = _ssl_context()
            ctx = self._ssl
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    _Connection, self._host, self._port, ssl=ctx, server_hostname=self._host if ctx else None
                )
        except TimeoutError:
            raise UpstreamTimeout("connect timed out") from None
        except OSError as exc:
            raise UpstreamConnectError(f"{type(exc).__name__}") from None
        sock = conn.sock
        if sock is not None:
            for level, option, value in [*_keepalive_options(), (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]:
                with contextlib.suppress(OSError):
                    sock.setsockopt(level, option, value)
        self.connections += 1
        return conn

    def _release(self, conn: _Connection) -> None:
        if conn.reusable and not conn.closed and len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:
            self._open -= 1
            if not conn.closed:
                conn.transport.close()
        self._wake_one()

    def _wake_one(self) -> None:
        while self._slots:
            slot = self._slots.popleft()
            if not slot.done():
                slot.set_result(None)
                return

    def close_idle(self) -> None:
        """Close the idle connections (those in use close when their call ends)."""
        while self._idle:
            conn = self._idle.pop()
            self._open -= 1
            conn.transport.close()

    async def close(self) -> None:
        """Close the idle connections (those in use close when their call ends)."""
        self.close_idle()


def _expire(conn: _Connection, waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout("the upstream did not answer in time"))
    conn.reusable = False


def _ssl_context() -> ssl.SSLContext:
    """The trust store and settings httpx uses (certifi, SSL_CERT_FILE/SSL_CERT_DIR honoured), HTTP/1.1 only."""
    import httpx2

    ctx = httpx2.create_ssl_context(trust_env=True)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx

"""The HTTP client the Anthropic SDK calls the upstream with: the SDK's own stack, with a cheap idle probe.

Before it sends a request (and again when a response is closed), httpx's connection pool asks
every idle keep-alive connection whether the server has closed it. The stock answer goes through
anyio's typed attributes, about 20 µs per connection; with 30 idle connections at concurrency 32
that was a third of the proxy's CPU. ProbedBackend gives the same answer (one poll() on the
connection's socket) with the socket looked up once, at connect. Everything else (TLS, timeouts,
limits, exceptions) is httpx's and httpcore's, unchanged. No grpc imports.
"""
from __future__ import annotations

import logging
import select
import socket
import urllib.request
from collections.abc import Iterable
from typing import Any

import anthropic
import httpcore2
import httpx2

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


class _ProbedStream(httpcore2.AsyncNetworkStream):
    """A network stream that answers "is_readable" from the socket it was connected on."""

    def __init__(self, inner: httpcore2.AsyncNetworkStream, sock: socket.socket | None):
        self._inner = inner
        self._sock = sock

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore2.AsyncNetworkStream:
        # TLS runs over the same socket, so the probe stays what httpcore's is.
        return _ProbedStream(await self._inner.start_tls(ssl_context, server_hostname, timeout), self._sock)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            return _readable(self._sock)
        return self._inner.get_extra_info(info)


class ProbedBackend(httpcore2.AsyncNetworkBackend):
    """httpcore's network backend, handing out streams with the cheap idle probe."""

    def __init__(self, inner: httpcore2.AsyncNetworkBackend):
        self._inner = inner
        self.connections = 0
        """Connections opened (tests check that the pool really uses this backend)."""

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore2.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, timeout=timeout, local_address=local_address,
                                               socket_options=socket_options)
        self.connections += 1
        return _ProbedStream(stream, stream.get_extra_info("socket"))

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> httpcore2.AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(path, timeout=timeout, socket_options=socket_options)
        self.connections += 1
        return _ProbedStream(stream, stream.get_extra_info("socket"))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class ProbedTransport(httpx2.AsyncHTTPTransport):
    """httpx's transport whose connection pool opens its connections through ProbedBackend."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        # httpx offers no public way to pass a network backend; its pool keeps the one it was built with here.
        pool = self._pool
        self.backend = ProbedBackend(pool._network_backend)
        pool._network_backend = self.backend


def make_http_client(*, timeout: float) -> httpx2.AsyncClient | None:
    """The SDK's default HTTP client with ProbedTransport; None (the SDK's own) when an HTTP proxy is configured."""
    if any(k in ("http", "https", "all") for k in urllib.request.getproxies()):
        return None   # the SDK routes through the proxy only with the transports it builds itself
    try:
        transport = ProbedTransport(limits=anthropic.DEFAULT_CONNECTION_LIMITS, socket_options=_keepalive_options())
    except AttributeError:   # an httpx without the pool this hooks into: the stock client still works
        log.warning("httpx changed: upstream calls use the stock connection probe")
        return None
    return anthropic.DefaultAsyncHttpxClient(transport=transport, timeout=timeout)

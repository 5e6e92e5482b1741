"""The SDK's HTTP stack with a cheap idle probe (upstream_http.make_http_client builds clients with it).

Imported on first use: an idle proxy does not carry httpx (3.6 MB). No grpc imports.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Any

import httpcore2
import httpx2

from services.inference.upstream_http import _readable

CONNECTION_LIMITS = httpx2.Limits(max_connections=1000, max_keepalive_connections=100)
"""The SDK's default pool limits (anthropic.DEFAULT_CONNECTION_LIMITS), without importing the SDK."""


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

    async def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore2.AsyncNetworkStream:
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

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(
            host, port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )
        self.connections += 1
        return _ProbedStream(stream, stream.get_extra_info("socket"))

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore2.AsyncNetworkStream:
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

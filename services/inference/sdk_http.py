"""The SDK's HTTP stack with a cheap idle probe (upstream_http.make_http_client builds clients with it), and
PoolTransport, which carries the SDK's unary calls on the proxy's kept-alive pool (through PoolClient, httpx's
client cut to those calls).

Imported on first use: an idle proxy does not carry httpx (3.6 MB). No grpc imports.
"""

from __future__ import annotations

import datetime
import logging
import socket
import time
from collections.abc import Iterable
from typing import Any

import httpcore2
import httpx2

from services.inference.upstream_http import (
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamPool,
    UpstreamTimeout,
    _readable,
)

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


_DROPPED_REQUEST_HEADERS = frozenset(
    {b"host", b"content-length", b"transfer-encoding", b"accept-encoding", b"connection"}
)
"""Request headers PoolTransport writes itself: the pool sets host and length, and only encodings it decodes."""

_DROPPED_REPLY_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding"})
"""Reply headers that describe the bytes on the wire, which the pool has decoded already."""


class PoolTransport(httpx2.AsyncBaseTransport):
    """The SDK's unary requests carried on the proxy's kept-alive pool (upstream_http.UpstreamPool).

    The SDK still builds every request (URL, key, version headers, body) and reads every reply (its
    status errors, its raw response); this transport, the SDK's documented `http_client` hook, only
    moves the bytes: about a quarter of a millisecond of CPU and of latency less per call than the
    aiohttp stack. Pool failures become the httpx errors the SDK expects (a refused connect a
    ConnectError, which is retry-safe). Only the pool's own origin is served, so no request (nor a
    redirect) can carry the key elsewhere. Streams keep the SDK's transport: the pool reads whole replies.
    """

    def __init__(self, pool: UpstreamPool, base_url: str):
        self.pool = pool
        url = httpx2.URL(base_url)
        self._origin = (url.scheme, url.host, url.port)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        url = request.url
        if (url.scheme, url.host, url.port) != self._origin:
            raise httpx2.UnsupportedProtocol("this transport serves only its upstream's origin")
        head = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (request.method.encode(), url.raw_path, url.netloc)]
        head.extend(
            b"%s: %s\r\n" % (name, value)
            for name, value in request.headers.raw
            if name.lower() not in _DROPPED_REQUEST_HEADERS
        )
        head.append(b"accept-encoding: gzip, deflate\r\n")
        try:
            reply = await self.pool.post(b"".join(head), await request.aread())
        except UpstreamConnectError as exc:
            raise httpx2.ConnectError(str(exc), request=request) from None
        except UpstreamTimeout as exc:
            raise httpx2.ReadTimeout(str(exc), request=request) from None
        except UpstreamBroken as exc:
            raise httpx2.RemoteProtocolError(str(exc), request=request) from None
        # Bytes as httpcore hands them to httpx; the length of the decoded body, as httpx adds for content.
        headers = [
            (name.encode("latin-1"), value.encode("latin-1"))
            for name, value in reply.headers.items()
            if name not in _DROPPED_REPLY_HEADERS
        ]
        headers.append((b"Content-Length", b"%d" % len(reply.body)))
        response = httpx2.Response(reply.status, headers=headers, stream=httpx2.ByteStream(reply.body), request=request)
        # The whole body is read already: what Response(content=...) ends with, without running it through
        # httpx's decoder and chunker generators (a tenth of a millisecond at concurrency 1, caches cold).
        response._content = reply.body
        return response

    async def aclose(self) -> None:
        await self.pool.close()


_httpx_log = logging.getLogger("httpx2")
"""httpx's own logger: the lean send logs each request line as httpx's does."""


class PoolClient(httpx2.AsyncClient):
    """The SDK's httpx client on PoolTransport, with httpx's build_request and send cut to what the SDK's calls
    here use.

    The SDK builds every request as it always does (URL, headers, JSON bytes) and calls build_request and send;
    for that one shape of request (an absolute URL, bytes, no query, files, cookies or auth) this client skips
    the layers that change nothing on PoolTransport: merging httpx's default headers (the SDK sets Accept and
    User-Agent, the transport writes host, length, encodings and keep-alive), the auth and redirect loops (no
    auth, redirects never followed) and a second copy of the headers. The same bytes go on the wire, header order
    included (a test compares with httpx's own client). With the absolute URL the provider posts to, about 40%
    of the SDK path's CPU per call; more of its latency at concurrency 1, where the code runs with cold caches.
    Any other request takes httpx's own path unchanged.
    """

    def __init__(self, transport: PoolTransport, *, timeout: float):
        super().__init__(transport=transport, timeout=timeout, follow_redirects=False)
        self._pool_transport = transport
        self._timeouts: tuple[Any, dict[str, Any]] | None = None
        """The last timeout the SDK passed and its request extension (the same on every call)."""

    def build_request(
        self,
        method: str,
        url: httpx2.URL | str,
        *,
        content: Any = None,
        data: Any = None,
        files: Any = None,
        json: Any = None,
        params: Any = None,
        headers: Any = None,
        cookies: Any = None,
        timeout: Any = httpx2.USE_CLIENT_DEFAULT,
        extensions: Any = None,
    ) -> httpx2.Request:
        if (
            not isinstance(content, bytes)
            or not isinstance(url, httpx2.URL)
            or not url.is_absolute_url
            or data is not None
            or files
            or json is not None
            or params
            or cookies
            or extensions
            or self.cookies
        ):
            return super().build_request(
                method,
                url,
                content=content,
                data=data,
                files=files,
                json=json,
                params=params,
                headers=headers,
                cookies=cookies,
                timeout=timeout,
                extensions=extensions,
            )
        stream = httpx2.ByteStream(content)
        request = httpx2.Request(method, url, stream=stream, extensions=self._timeout_extension(timeout))
        # The SDK's headers as they are (built for this request alone): a copy would forget their encoding.
        request.headers = headers if isinstance(headers, httpx2.Headers) else httpx2.Headers(headers)
        request.read()  # the body is in memory already: what httpx does for bytes content
        return request

    def _timeout_extension(self, timeout: Any) -> dict[str, Any]:
        """The request extension of a timeout: the SDK passes the same one on every call."""
        cached = self._timeouts
        if cached is None or cached[0] != timeout:
            value = self.timeout if timeout is httpx2.USE_CLIENT_DEFAULT else httpx2.Timeout(timeout)
            cached = self._timeouts = (timeout, {"timeout": value.as_dict()})
        return cached[1]

    async def send(
        self,
        request: httpx2.Request,
        *,
        stream: bool = False,
        auth: Any = httpx2.USE_CLIENT_DEFAULT,
        follow_redirects: Any = httpx2.USE_CLIENT_DEFAULT,
    ) -> httpx2.Response:
        own_auth = auth is not httpx2.USE_CLIENT_DEFAULT and auth is not None
        if own_auth or self.auth is not None or follow_redirects is True:  # httpx's loops for those
            return await super().send(request, stream=stream, auth=auth, follow_redirects=follow_redirects)
        if self.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        if "timeout" not in request.extensions:
            request.extensions["timeout"] = self.timeout.as_dict()
        start = time.perf_counter()
        response = await self._pool_transport.handle_async_request(request)
        response.request = request
        response.elapsed = datetime.timedelta(seconds=time.perf_counter() - start)
        if "set-cookie" in response.headers:  # kept for the next requests, as httpx's send does
            self.cookies.extract_cookies(response)
        if _httpx_log.isEnabledFor(logging.INFO):
            _httpx_log.info(
                'HTTP Request: %s %s "%s %d %s"',
                request.method,
                request.url,
                response.http_version,
                response.status_code,
                response.reason_phrase,
            )
        if not stream:
            await response.aread()
        return response

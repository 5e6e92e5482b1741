"""GetSecret's KV v2 read from OpenBao as one HTTP/1.1 GET on a kept-alive connection, on the event loop.

The general path (hvac over requests, in a worker thread) spends about 0.6 ms of CPU per read here
building and parsing the request (hooks, cookies, adapters, settings merging) and two thread hops.
This path writes the same request, with the same tenant token to the same node, on an asyncio
connection kept open between reads, and parses the one answer it accepts: OpenBao still applies
the tenant's policy to every read.

Only the plain case is handled: a 200 carrying the value, with the tenant's token already minted.
Anything else (no token yet, 403, 404, a sealed or standby node, a redirect, a dropped connection,
a proxy or client certificate) returns None, and the caller makes the read through hvac, whose
error handling, token re-provisioning and node failover stay the one place those rules live.
Nothing read here is logged or put in an exception.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import urllib.parse
from typing import Protocol

import requests.certs

from services.credentials.backend import StoredValue, TenantRef
from services.credentials.vault_layout import VaultLayout

MAX_IDLE = 16
"""Connections kept open per node between reads (more are opened under load and closed after)."""


class _Tokens(Protocol):
    def cached_token(self, tenant: TenantRef) -> str | None: ...


class _Session(Protocol):
    proxies: dict
    verify: bool | str

    @property
    def cert(self) -> object: ...

    @property
    def current(self) -> str: ...


class KvReader:
    """Reads KV v2 versions with a tenant's token over pooled asyncio connections."""

    def __init__(self, session: _Session, tokens: _Tokens, layout: VaultLayout, *, timeout: float) -> None:
        """session: the backend's requests session (the node in use, proxy and TLS settings)."""
        self._session, self._tokens, self._layout, self._timeout = session, tokens, layout, timeout
        self._idle: dict[str, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._closed = False
        self.reads = 0
        """Reads answered here (tests check the path is taken)."""

    async def read(self, tenant: TenantRef, path: str, version: int | None) -> StoredValue | None:
        """The version at path, or None when the caller must take the full (hvac) path."""
        token = self._tokens.cached_token(tenant)
        node = self._session.current
        url = urllib.parse.urlsplit(node)
        if token is None or self._closed or not self._supported(url):
            return None
        target = (
            f"{url.path.rstrip('/')}/v1/{urllib.parse.quote(self._layout.kv_mount)}/data/{urllib.parse.quote(path)}"
        )
        if version is not None:
            target += f"?version={int(version)}"
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: {url.netloc}",
            f"X-Vault-Token: {token}",
            "X-Vault-Request: true",
            "Accept: application/json",
        ]
        namespace = self._layout.namespace(tenant)
        if namespace:
            lines.append(f"X-Vault-Namespace: {namespace}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode()
        idle = self._idle.setdefault(node, [])
        while idle:  # a kept connection the server closed meanwhile is dropped, not retried
            conn = idle.pop()
            if not conn[0].at_eof():
                answer = await self._exchange(conn, request, node)
                if answer is not _DROPPED:
                    return answer
        try:
            async with asyncio.timeout(self._timeout):
                conn = await asyncio.open_connection(
                    url.hostname,
                    url.port or (443 if url.scheme == "https" else 80),
                    ssl=self._ssl_context() if url.scheme == "https" else None,
                )
        except Exception:  # noqa: BLE001 - unreachable: the full path fails over or reports it
            return None
        answer = await self._exchange(conn, request, node)
        return None if answer is _DROPPED else answer

    async def close(self) -> None:
        """Close every kept connection (the backend is closing)."""
        self._closed = True
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for _, writer in conns:
                writer.close()

    async def _exchange(self, conn, request: bytes, node: str):
        """One request and its answer: the value, None (answered, but not as a value read here: the
        caller asks hvac) or _DROPPED (the connection failed: another connection may be tried)."""
        reader, writer = conn
        keep = False
        try:
            async with asyncio.timeout(self._timeout):
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status, length, keep = _parse_head(head)
                if length is None:  # chunked or unknown length (a large value): answered, not read here
                    writer.close()
                    return None
                body = await reader.readexactly(length)
        except BaseException as exc:
            writer.close()
            if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                raise
            return _DROPPED
        if keep and not self._closed and len(self._idle.setdefault(node, [])) < MAX_IDLE:
            self._idle[node].append(conn)
        else:
            writer.close()
        if status != 200:
            return None
        try:
            data = json.loads(body)["data"]
            value = StoredValue(int(data["metadata"]["version"]), base64.b64decode(data["data"]["value"]))
        except Exception:  # noqa: BLE001 - a shape we do not know (e.g. a deleted version): hvac decides
            return None
        self.reads += 1
        return value

    def _supported(self, url: urllib.parse.SplitResult) -> bool:
        """Plain or TLS connections to the node; proxies and client certificates only on the full path."""
        proxies = self._session.proxies
        return (
            url.scheme in ("http", "https")
            and bool(url.hostname)
            and not proxies.get(url.scheme)
            and not proxies.get("all")
            and not self._session.cert
        )

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            verify = self._session.verify  # as requests reads it: a CA file or directory, or its bundle
            if verify is False:
                context = ssl.create_default_context()
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            else:
                where = verify if isinstance(verify, str) else requests.certs.where()
                context = (
                    ssl.create_default_context(capath=where)
                    if os.path.isdir(where)
                    else ssl.create_default_context(cafile=where)
                )
            self._ssl = context
        return self._ssl


_DROPPED = object()
"""The connection failed or was left unusable; it has been closed."""


def _parse_head(head: bytes) -> tuple[int, int | None, bool]:
    """(status, Content-Length or None, whether the connection may be reused) of a response head."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ValueError("not an HTTP/1.x response")
    status, length, keep = int(parts[1]), None, parts[0] == b"HTTP/1.1"
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding":
            return status, None, False
        elif name == b"connection":
            keep = value.strip().lower() == b"keep-alive" or (keep and value.strip().lower() != b"close")
    return status, length, keep

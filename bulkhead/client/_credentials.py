"""A token that renews itself from an API key shortly before it expires."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc

from bulkhead.identity.v1 import identity_pb2, identity_pb2_grpc
from shared.client import MetadataSource

REFRESH_MARGIN = 60.0
"""Seconds before expiry at which the token is renewed."""


class RefreshingToken(MetadataSource):
    """Adds authorization and x-tenant-id to every call, renewing the token from the API key when due."""

    def __init__(
        self,
        identity_channel: grpc.aio.Channel,
        api_key: str | None = None,
        *,
        token: str | None = None,
        tenant_id: str | None = None,
        expires_at: float = float("inf"),
        ttl_seconds: int = 0,
        clock=time.time,
    ):
        self._stub = identity_pb2_grpc.IdentityServiceStub(identity_channel)
        self._api_key = api_key
        self.token = token
        self.tenant_id = tenant_id
        self.expires_at = expires_at if token else 0.0
        self._ttl = ttl_seconds
        self._clock = clock
        self._lock = asyncio.Lock()
        self.refreshes = 0

    async def current(self) -> tuple[str, str]:
        """(token, tenant id), renewed first if it expires within REFRESH_MARGIN."""
        if self.token is None or self.expires_at - self._clock() < REFRESH_MARGIN:
            async with self._lock:
                if self.token is None or self.expires_at - self._clock() < REFRESH_MARGIN:
                    await self._refresh()
        if self.token is None:  # _refresh raised already; this says so to the type checker
            raise RuntimeError("no credentials")
        return self.token, self.tenant_id or ""

    async def _refresh(self) -> None:
        if not self._api_key:
            if self.token is None:
                raise RuntimeError("no credentials: set BULKHEAD_API_KEY (or BULKHEAD_TOKEN and BULKHEAD_TENANT)")
            return  # a fixed token cannot be renewed; let the server say when it expires
        resp = await self._stub.IssueToken(
            identity_pb2.IssueTokenRequest(api_key=self._api_key, ttl_seconds=self._ttl), timeout=10
        )
        self.token, self.tenant_id, self.expires_at = resp.token, resp.tenant_id, float(resp.expire_time.seconds)
        self.refreshes += 1

    async def call_details(self, details):
        token, tenant = await self.current()
        md = [kv for kv in (details.metadata or ()) if kv[0] not in ("authorization", "x-tenant-id")]
        if not any(k == "x-request-id" for k, _ in md):
            md.append(("x-request-id", uuid.uuid4().hex))
        return details._replace(
            metadata=grpc.aio.Metadata(*md, ("authorization", f"Bearer {token}"), ("x-tenant-id", tenant))
        )

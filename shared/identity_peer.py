"""A platform service's client of identity, asking with the service's own platform key."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import grpc

from bulkhead.identity.v1 import identity_pb2_grpc
from shared.errors import BulkheadError, NotFound, Unavailable, peer_call

log = logging.getLogger("bulkhead.identity_peer")


class IdentityPeer:
    """Identity's stub, the credentials to call it with, a per-call timeout, and the channel to close if ours."""

    def __init__(
        self, channel: grpc.aio.Channel, credentials: Any, *, timeout: float, owns_channel: bool = False
    ) -> None:
        self._stub = identity_pb2_grpc.IdentityServiceStub(channel)
        self._channel = channel
        self._credentials = credentials
        self._timeout = timeout
        self._owns_channel = owns_channel

    async def close(self) -> None:
        """Close the channel if this object opened it."""
        if self._owns_channel:
            await self._channel.close()


@contextlib.contextmanager
def about_tenant(tenant_id: str, what: str, reason: str) -> Iterator[None]:
    """A question to identity about one tenant (its `what`: tier, region): NOT_FOUND is TENANT_NOT_FOUND, any
    other failure Unavailable with `reason` (fail closed: data written under a guessed tier or region lands
    where the tenant never reads it, or where the law says it must not be)."""
    try:
        with peer_call():
            yield
    except NotFound:
        raise NotFound("tenant not found", reason="TENANT_NOT_FOUND") from None
    except BulkheadError as exc:
        log.warning("identity could not say the %s of tenant %s: %s", what, tenant_id, exc.code.name)
        message = f"identity could not confirm the tenant's {what}; nothing was changed, retry"
        raise Unavailable(message, reason=reason, retry_after=1.0) from None

"""A platform service's client of identity, asking with the service's own platform key."""

from __future__ import annotations

from typing import Any

import grpc

from bulkhead.identity.v1 import identity_pb2_grpc


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

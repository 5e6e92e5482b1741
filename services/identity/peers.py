"""identity's peers: every other service's TenantLifecycleService, which a tenant's deletion (deletion.py) and
migration (migration.py) drive, asked with identity's own platform token.

Every call runs in errors.peer_call(): a peer's failure arrives as our own error, which the plans record on
the step and retry on their next pass.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

import grpc
from google.protobuf.message import Message

from bulkhead.common.v1 import lifecycle_pb2_grpc
from services.identity.signing import SigningKeys, utcnow
from shared.errors import Unavailable, peer_call
from shared.lifecycle import LIFECYCLE_SCOPE
from shared.tenancy import PLATFORM_TENANT
from shared.tokens import TokenIssuer

_TOKEN_TTL = 300
CALL_TIMEOUT = 120.0
"""A lifecycle call copies or purges a tenant's rows: minutes, not seconds."""


class PlatformCaller:
    """identity's own platform token (platform.lifecycle), minted by itself: it is the issuer."""

    def __init__(self, keys: SigningKeys) -> None:
        self._keys = keys
        self._token: tuple[str, float] | None = None

    async def metadata(self) -> tuple[tuple[str, str], ...]:
        now = utcnow().timestamp()
        if self._token is None or self._token[1] - now < _TOKEN_TTL / 3:
            token, claims = TokenIssuer(await self._keys.active()).issue(
                tenant_id=PLATFORM_TENANT, principal_id="identity", scopes=frozenset({LIFECYCLE_SCOPE}), ttl=_TOKEN_TTL
            )
            self._token = (token, float(claims.expires_at))
        return ("authorization", f"Bearer {self._token[0]}"), ("x-tenant-id", PLATFORM_TENANT)


class LifecyclePeers:
    """The services a tenant's lifecycle plans call, by name."""

    def __init__(
        self,
        keys: SigningKeys,
        addresses: MutableMapping[str, str],
        channel_for: Callable[[str], grpc.aio.Channel],
    ) -> None:
        """addresses: service name -> address (a mutable map: tests fill it once the services listen)."""
        self.addresses = addresses
        self._channel_for = channel_for
        self._caller = PlatformCaller(keys)

    async def call(self, service: str, method: str, request: Message) -> Any:
        """One TenantLifecycleService RPC on `service` (e.g. "PurgeTenant"); a failure is our own error
        (peer_call), a service with no address Unavailable."""
        address = self.addresses.get(service)
        if not address:
            raise Unavailable(f"no address for {service}")
        stub = lifecycle_pb2_grpc.TenantLifecycleServiceStub(self._channel_for(address))
        with peer_call():
            return await getattr(stub, method)(request, timeout=CALL_TIMEOUT, metadata=await self._caller.metadata())

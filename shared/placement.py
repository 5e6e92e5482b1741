"""Where a tenant's data lives, as the control plane says: identity's placement (tier, region).

Data residency: every data-plane service has a database per configured region (shared.config,
BULKHEAD_REGIONS) and writes a tenant's rows only to its region's (shared.db.router). The region is
never the caller's to choose, not even through a signed token: identity records it at CreateTenant
and answers GetTenantPlacement to platform services' keys; the router asks once per tenant and
process and keeps the answer (only a migration moves a tenant, and it makes routers forget).

A single-region deployment asks nothing: `open_service_database` wires no lookup at all then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from bulkhead.identity.v1 import identity_pb2
from shared.config import ServiceConfig
from shared.db import Database
from shared.errors import Unavailable
from shared.identity_peer import IdentityPeer, about_tenant
from shared.tiers import UnknownTier, tier_from_proto


class IdentityPlacements(IdentityPeer):
    """A tenant's region from identity's GetTenantPlacement, asked with the service's platform key."""

    def __init__(
        self, channel: grpc.aio.Channel, credentials: Any, *, timeout: float = 3.0, owns_channel: bool = False
    ) -> None:
        super().__init__(channel, credentials, timeout=timeout, owns_channel=owns_channel)

    async def region_of(self, tenant_id: str) -> tuple[str, str]:
        """The tenant's (region, tier); NotFound for no such tenant; Unavailable when identity cannot say (fail
        closed: a guessed region writes the tenant's rows where the law says they must not be). The tier
        routes the tenant over its token's claim, so a restarted service follows a finished tier migration."""
        with about_tenant(tenant_id, "region", "TENANT_REGION_UNAVAILABLE"):
            reply = await self._stub.GetTenantPlacement(
                identity_pb2.GetTenantPlacementRequest(tenant_id=tenant_id),
                timeout=self._timeout,
                metadata=await self._credentials.metadata(),
            )
        if not reply.region:
            raise Unavailable(
                "identity returned no region for the tenant; retry", reason="TENANT_REGION_UNAVAILABLE", retry_after=1.0
            )
        try:
            tier = tier_from_proto(reply.tier).value if reply.tier else ""
        except UnknownTier:  # a newer identity's tier: route by the token's claim
            tier = ""
        return reply.region, tier


async def open_service_database(
    service: ServiceConfig, *, migrations: str | Path | None, read_url: str | None = None, **engine_options: Any
) -> Database:
    """A data-plane service's Database: its default region's URLs, every other configured region's
    database, and (with several regions) identity's placement of each tenant to route by."""
    from shared.client import make_channel
    from shared.keys import ServiceKeyCredentials

    regions = service.region_databases()
    placements = None
    if len(regions) > 1:
        channel = make_channel(service.peer("identity"), tls=service.tls)
        placements = IdentityPlacements(
            channel, ServiceKeyCredentials(channel, service.service_key_file), owns_channel=True
        )
    try:
        db = await Database.open(
            service.database_url,
            migrations=migrations,
            owner_url=service.database_owner_url,
            read_url=read_url,
            regions=regions,
            region_of=placements.region_of if placements else None,
            **{"pool_size": service.database_pool, "max_overflow": service.database_overflow, **engine_options},
        )
    except BaseException:
        if placements is not None:
            await placements.close()
        raise
    if placements is not None:
        db.on_close(placements.close)
    return db

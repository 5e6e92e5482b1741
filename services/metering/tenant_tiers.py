"""Which tier a tenant is (and so where its metering rows live), for operator calls about it.

A tenant's own calls carry its tier in their signed token, and metering remembers it. An operator's
SetQuota or GetQuota may come before the tenant's first call, though: guessing "pooled" then would
store a bridge or silo tenant's budget where its reservations never look, an unenforced budget.
So an unseen tenant's tier is asked of identity, with the operator's own token forwarded.
"""
from __future__ import annotations

from typing import Protocol

import grpc

from bulkhead.common.v1 import tenancy_pb2
from bulkhead.identity.v1 import identity_pb2, identity_pb2_grpc
from shared.errors import NotFound, Unavailable

_TIERS = {tenancy_pb2.TIER_BRIDGE: "bridge", tenancy_pb2.TIER_SILO: "silo"}


def tier_name(tier: int) -> str:
    """A Tier enum value as the tier name shared.db routes by (unspecified is pooled)."""
    return _TIERS.get(tier, "pooled")


class TierLookup(Protocol):
    """Identity's answer to "what tier is this tenant"."""

    async def tier_of(self, tenant_id: str) -> str:
        """pooled, bridge or silo; NotFound when there is no such tenant."""


class IdentityTiers:
    """TierLookup through identity's GetTenant, on a channel that forwards the caller's identity."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = identity_pb2_grpc.IdentityServiceStub(channel)

    async def tier_of(self, tenant_id: str) -> str:
        try:
            reply = await self._stub.GetTenant(identity_pb2.GetTenantRequest(tenant_id=tenant_id), timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound("tenant not found", reason="TENANT_NOT_FOUND") from None
            # Fail closed: a quota stored in the wrong place would not be enforced.
            raise Unavailable("identity could not confirm the tenant's tier; nothing was changed, retry",
                              reason="TENANT_TIER_UNAVAILABLE", retry_after=1.0) from None
        return tier_name(reply.tenant.tier)

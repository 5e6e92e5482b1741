"""Isolation tiers, once: the Tier type, its proto enum both ways, and identity's word on a tenant's tier.

A tier decides where a tenant's rows live (shared/db routes by it). Guessing one ("pooled" when
unsure) files a bridge or silo tenant's data where its own calls never look, so nothing here
guesses: an unknown name or enum value raises, and a lookup that cannot reach identity fails.
"""

from __future__ import annotations

import enum
from typing import Protocol

import grpc

from bulkhead.common.v1 import tenancy_pb2
from bulkhead.identity.v1 import identity_pb2, identity_pb2_grpc
from shared.identity_peer import about_tenant


class UnknownTier(ValueError):
    """A tier name or enum value that is not pooled, bridge or silo."""


class Tier(enum.StrEnum):
    """How strongly a tenant's data is separated; the value is what tokens and shared/db carry."""

    POOLED = "pooled"
    """Shared tables, separated by row."""
    BRIDGE = "bridge"
    """A schema (Postgres) or SQLite file of its own."""
    SILO = "silo"
    """A database (Postgres) or SQLite file of its own, and its own secret-manager namespace."""

    @classmethod
    def parse(cls, value: str) -> Tier:
        """The Tier named `value`; UnknownTier for anything else (an empty string too)."""
        try:
            return cls(value)
        except ValueError:
            raise UnknownTier(f"unknown tenant tier {value!r}: pooled, bridge or silo") from None


_TO_PROTO: dict[Tier, tenancy_pb2.Tier] = {
    Tier.POOLED: tenancy_pb2.TIER_POOLED,
    Tier.BRIDGE: tenancy_pb2.TIER_BRIDGE,
    Tier.SILO: tenancy_pb2.TIER_SILO,
}
# The proto says an unset tier is pooled (CreateTenant, RecordTenantUsage from old callers).
_FROM_PROTO: dict[int, Tier] = {v: k for k, v in _TO_PROTO.items()}
_FROM_PROTO[tenancy_pb2.TIER_UNSPECIFIED] = Tier.POOLED


def tier_to_proto(tier: str) -> tenancy_pb2.Tier:
    """The bulkhead.common.v1.Tier value of a tier name; UnknownTier for an unknown name."""
    return _TO_PROTO[Tier.parse(tier)]


def tier_from_proto(value: int) -> Tier:
    """The Tier of a bulkhead.common.v1.Tier value (unspecified is pooled); UnknownTier otherwise."""
    try:
        return _FROM_PROTO[value]
    except KeyError:
        raise UnknownTier(f"unknown tenant tier enum value {value}") from None


class TierLookup(Protocol):
    """Identity's answer to "what tier is this tenant", for calls made about a tenant by someone else."""

    async def tier_of(self, tenant_id: str) -> Tier:
        """The tenant's tier; NotFound when there is no such tenant, Unavailable when unsure."""


class IdentityTiers:
    """TierLookup through identity's GetTenant, on a channel that forwards the caller's (operator's) token."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float = 5.0) -> None:
        self._stub = identity_pb2_grpc.IdentityServiceStub(channel)
        self._timeout = timeout

    async def tier_of(self, tenant_id: str) -> Tier:
        with about_tenant(tenant_id, "tier", "TENANT_TIER_UNAVAILABLE"):
            reply = await self._stub.GetTenant(
                identity_pb2.GetTenantRequest(tenant_id=tenant_id), timeout=self._timeout
            )
        return tier_from_proto(reply.tenant.tier)

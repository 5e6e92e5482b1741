"""The inference proxy's peers: gRPC adapters to metering and credentials, behind the small interfaces the domain uses.

Every call runs with the tenant's context bound and forwards its identity (the channel is
made with forward=True), so metering and credentials check the tenant themselves. Every call runs in
errors.peer_call(): a peer's failure arrives as our own error, and the domain's cases are caught by class.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Sequence

import grpc
from google.protobuf import timestamp_pb2

from bulkhead.client import RefreshingToken
from bulkhead.credentials.v1 import credentials_pb2, credentials_pb2_grpc
from bulkhead.metering.v1 import metering_pb2 as mpb
from bulkhead.metering.v1 import metering_pb2_grpc
from services.inference.budget import (
    BackendUnavailable,
    BudgetRefused,
    Grant,
    LeaseGone,
    Tokens,
)
from services.inference.limits import Limits
from services.inference.usage import UsageEvent, UsageRejected
from shared import errors
from shared.cache import TenantCache
from shared.config import ServiceConfig
from shared.errors import peer_call
from shared.logs import register_secret
from shared.scaffold import Startup
from shared.tenancy import TenantContext
from shared.tiers import UnknownTier, tier_to_proto

log = logging.getLogger("bulkhead.inference")

HOLDER = f"{socket.gethostname()[:120]}:{os.getpid()}:{secrets.token_hex(4)}"
"""This process as a lease holder at metering: host, pid and a nonce drawn at start (a restart is a new holder)."""
LEASE_TTL_S = 6
"""Budget leases live 6 s unless renewed; maintenance renews them every 2 s while held, so a killed
replica's leases come back within seconds (a 60 s TTL left them refusing calls for a minute)."""
_OUTCOMES = {
    "success": mpb.OUTCOME_SUCCESS,
    "error": mpb.OUTCOME_ERROR,
    "rejected": mpb.OUTCOME_REJECTED,
    "cancelled": mpb.OUTCOME_CANCELLED,
}


def _counts(t: Tokens) -> mpb.TokenCounts:
    return mpb.TokenCounts(
        input_tokens=t.input, output_tokens=t.output, cache_write_tokens=t.cache_write, cache_read_tokens=t.cache_read
    )


class MeteringClient:
    """Budget leases, usage recording and quota lookup on metering."""

    def __init__(
        self, channel: grpc.aio.Channel, *, timeout: float = 3.0, lease_ttl: int = LEASE_TTL_S, holder: str = HOLDER
    ):
        self._stub = metering_pb2_grpc.MeteringServiceStub(channel)
        self._timeout = timeout
        self._lease_ttl = lease_ttl
        self._holder = holder

    # BudgetBackend
    async def lease(self, model: str, tokens: int, min_tokens: int) -> Grant:
        """LeaseBudget; BudgetRefused when the budget cannot cover min_tokens."""
        request = mpb.LeaseBudgetRequest(
            model=model, tokens=tokens, min_tokens=min_tokens, ttl_seconds=self._lease_ttl, holder=self._holder
        )
        try:
            resp = await _metering(self._stub.LeaseBudget, request, self._timeout)
        except errors.ResourceExhausted as exc:
            raise BudgetRefused(exc.message, exc.violations or [("budget", "exhausted")], exc.retry_after) from None
        except (errors.PermissionDenied, errors.Unauthenticated):
            raise _missing_scope("metering.budget.write") from None
        except errors.BulkheadError as exc:
            raise BackendUnavailable(f"metering LeaseBudget: {exc.code.name}") from None
        return Grant(resp.lease.lease_id, resp.lease.granted.tokens, float(self._lease_ttl))

    async def renew(self, lease_id: str, spent: Tokens, in_flight: int = 0) -> None:
        """RenewLease (the heartbeat) with the total spent so far and the tokens calls in flight hold."""
        request = mpb.RenewLeaseRequest(
            lease_id=lease_id, spent=_counts(spent), ttl_seconds=self._lease_ttl, in_flight_tokens=in_flight
        )
        await _metering(self._stub.RenewLease, request, self._timeout)

    async def release(self, lease_id: str, spent: Tokens) -> None:
        """ReleaseLease with the final spend."""
        request = mpb.ReleaseLeaseRequest(lease_id=lease_id, spent=_counts(spent))
        await _metering(self._stub.ReleaseLease, request, self._timeout)

    # UsageBackend
    async def record(self, events: Sequence[UsageEvent]) -> None:
        """RecordUsage for one tenant's batch (idempotent by request id)."""
        request = mpb.RecordUsageRequest(events=[_event(e) for e in events])
        try:
            await _metering(self._stub.RecordUsage, request, self._timeout)
        except errors.InvalidArgument as exc:
            raise UsageRejected(exc.message) from None

    # quota
    async def limits(self) -> Limits:
        """The caller's rate limits from its Quota (PermissionDenied when the token may not read them)."""
        try:
            resp = await _metering(self._stub.GetQuotaStatus, mpb.GetQuotaStatusRequest(), self._timeout)
        except (errors.PermissionDenied, errors.Unauthenticated):
            raise _missing_scope("metering.quota.read") from None
        except errors.BulkheadError as exc:
            raise BackendUnavailable(f"metering GetQuotaStatus: {exc.code.name}") from None
        q = resp.quota
        return Limits(int(q.requests_per_minute), int(q.tokens_per_minute), int(q.concurrent_calls))


class PlatformUsage:
    """Metering calls with the proxy's own platform token (the channel adds it), for when the
    tenant's own token is gone or refused: the outbox's RecordTenantUsage (usage.PlatformDelivery)
    and a suspended tenant's ReleaseTenantLease (budget.PlatformLeases)."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float = 3.0):
        self._stub = metering_pb2_grpc.MeteringServiceStub(channel)
        self._timeout = timeout

    async def record_for(self, tenant_id: str, events: Sequence[UsageEvent]) -> None:
        """One tenant's events, oldest first (idempotent by request id)."""
        try:
            tier = tier_to_proto(events[0].tier)
        except UnknownTier as exc:  # metering could never file these: rejected, not retried forever
            raise UsageRejected(str(exc)) from None
        request = mpb.RecordTenantUsageRequest(tenant_id=tenant_id, tier=tier, events=[_event(e) for e in events])
        try:
            await _metering(self._stub.RecordTenantUsage, request, self._timeout)
        except errors.InvalidArgument as exc:
            raise UsageRejected(exc.message) from None

    async def release_for(self, ctx: TenantContext, lease_id: str, spent: Tokens) -> None:
        """Settle one of the tenant's leases with its final spend (idempotent: a settled lease stays settled)."""
        request = mpb.ReleaseTenantLeaseRequest(
            tenant_id=ctx.tenant_id, tier=tier_to_proto(ctx.tier), lease_id=lease_id, spent=_counts(spent)
        )
        await _metering(self._stub.ReleaseTenantLease, request, self._timeout)


_GONE = {"LEASE_EXPIRED", "LEASE_RELEASED", "LEASE_NOT_FOUND"}


async def _metering(method, request, timeout: float):
    """One call to metering: down (UNAVAILABLE, DEADLINE_EXCEEDED) is BackendUnavailable, a lease metering no
    longer holds open (expired, settled, unknown) is LeaseGone, any other failure our own error (peer_call)."""
    try:
        with peer_call():
            return await method(request, timeout=timeout)
    except errors.Unavailable as exc:  # also a peer's DEADLINE_EXCEEDED (errors.RpcFailure.to_error)
        raise BackendUnavailable(f"metering: {exc.code.name}") from None
    except (errors.FailedPrecondition, errors.NotFound) as exc:
        if exc.reason in _GONE:
            raise LeaseGone(f"metering: {exc.reason}") from None
        raise


def _missing_scope(scope: str) -> errors.PermissionDenied:
    """A token that may not read its limits or hold budget must not get unlimited calls: refuse it."""
    return errors.PermissionDenied(
        f"model calls need a token that also holds {scope}",
        reason=errors.Reason.MISSING_SCOPE,
        metadata={"scope": scope},
    )


def _event(e: UsageEvent) -> mpb.UsageEvent:
    occur = timestamp_pb2.Timestamp()
    occur.FromNanoseconds(int(e.occurred_at * 1e9))
    return mpb.UsageEvent(
        idempotency_key=e.idempotency_key,
        principal_id=e.principal_id,
        agent_id=e.agent_id,
        run_id=e.run_id,
        model=e.model,
        tokens=_counts(e.tokens),
        latency_ms=e.latency_ms,
        outcome=_OUTCOMES.get(e.outcome, mpb.OUTCOME_UNSPECIFIED),
        occur_time=occur,
        trace_id=e.trace_id,
    )


class CredentialsKeys:
    """The tenant's own provider key from credentials, cached briefly per tenant."""

    def __init__(self, channel: grpc.aio.Channel, *, secret_name: str, ttl: float = 30.0, timeout: float = 3.0):
        self._stub = credentials_pb2_grpc.CredentialsServiceStub(channel)
        self._secret_name = secret_name
        self._timeout = timeout
        self._cache: TenantCache[str | None] = TenantCache(ttl)  # bounded; concurrent misses share one read

    async def tenant_key(self, ctx: TenantContext) -> str | None:
        """The key stored under the configured secret name, or None when the tenant has none."""
        return await self._cache.load(ctx.tenant_id, self._fetch)

    async def _fetch(self) -> str | None:
        try:
            with peer_call():
                resp = await self._stub.GetSecret(
                    credentials_pb2.GetSecretRequest(name=self._secret_name), timeout=self._timeout
                )
        # NOT_FOUND: no key of its own. PERMISSION_DENIED: this caller may not read it; the platform key
        # serves (never another tenant's: credentials only answers for the caller's).
        except (errors.NotFound, errors.PermissionDenied):
            return None
        except errors.BulkheadError as exc:
            raise BackendUnavailable(f"credentials: {exc.code.name}") from None
        key = resp.value.decode()
        register_secret(key)
        return key


class NoTenantKeys:
    """Used when no credentials service is configured: every tenant uses the platform key."""

    async def tenant_key(self, ctx: TenantContext) -> str | None:
        return None


def platform_usage(service: ServiceConfig, up: Startup) -> PlatformUsage | None:
    """RecordTenantUsage with the proxy's own service key, when identity made one (see SERVICE_PRINCIPALS)."""
    path = service.service_key_file
    if path is None or not path.is_file():
        log.warning(
            "no service key at %s: usage held in the outbox reaches metering only when its tenant "
            "calls again (set BULKHEAD_INFERENCE_SERVICE_KEY_FILE)",
            path,
        )
        return None
    key = path.read_text().strip()
    register_secret(key)
    token = RefreshingToken(up.channel(service.peer("identity")), key)
    return PlatformUsage(up.channel(service.peer("metering"), credentials=token))

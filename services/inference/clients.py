"""gRPC adapters to metering and credentials, behind the small interfaces the domain uses.

Every call runs with the tenant's context bound and forwards its identity (the channel is
made with forward=True), so metering and credentials check the tenant themselves.
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
from shared.errors import error_details
from shared.logs import register_secret
from shared.scaffold import Startup
from shared.tenancy import TenantContext
from shared.tiers import UnknownTier, tier_to_proto

log = logging.getLogger("bulkhead.inference")

_DOWN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

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
        try:
            resp = await self._stub.LeaseBudget(
                mpb.LeaseBudgetRequest(
                    model=model, tokens=tokens, min_tokens=min_tokens, ttl_seconds=self._lease_ttl, holder=self._holder
                ),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                details = error_details(exc)
                raise BudgetRefused(
                    exc.details() or "budget exhausted",
                    details["quota"] or [("budget", "exhausted")],
                    details["retry_after"],
                ) from None
            _refuse_if_denied(exc, "metering.budget.write")
            raise BackendUnavailable(f"metering LeaseBudget: {exc.code().name}") from None
        return Grant(resp.lease.lease_id, resp.lease.granted.tokens, float(self._lease_ttl))

    async def renew(self, lease_id: str, spent: Tokens, in_flight: int = 0) -> None:
        """RenewLease (the heartbeat) with the total spent so far and the tokens calls in flight hold."""
        try:
            await self._call(
                self._stub.RenewLease,
                mpb.RenewLeaseRequest(
                    lease_id=lease_id, spent=_counts(spent), ttl_seconds=self._lease_ttl, in_flight_tokens=in_flight
                ),
            )
        except grpc.aio.AioRpcError as exc:
            _gone_if_settled(exc)
            raise

    async def release(self, lease_id: str, spent: Tokens) -> None:
        """ReleaseLease with the final spend."""
        try:
            await self._call(self._stub.ReleaseLease, mpb.ReleaseLeaseRequest(lease_id=lease_id, spent=_counts(spent)))
        except grpc.aio.AioRpcError as exc:
            _gone_if_settled(exc)
            raise

    # UsageBackend
    async def record(self, events: Sequence[UsageEvent]) -> None:
        """RecordUsage for one tenant's batch (idempotent by request id)."""
        try:
            await self._call(self._stub.RecordUsage, mpb.RecordUsageRequest(events=[_event(e) for e in events]))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise UsageRejected(exc.details()) from None
            raise

    # quota
    async def limits(self) -> Limits:
        """The caller's rate limits from its Quota (PermissionDenied when the token may not read them)."""
        try:
            resp = await self._call(self._stub.GetQuotaStatus, mpb.GetQuotaStatusRequest())
        except grpc.aio.AioRpcError as exc:
            _refuse_if_denied(exc, "metering.quota.read")
            raise BackendUnavailable(f"metering GetQuotaStatus: {exc.code().name}") from None
        q = resp.quota
        return Limits(int(q.requests_per_minute), int(q.tokens_per_minute), int(q.concurrent_calls))

    async def _call(self, method, request):
        try:
            return await method(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _DOWN:
                raise BackendUnavailable(f"metering: {exc.code().name}") from None
            raise


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
            await self._stub.RecordTenantUsage(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise UsageRejected(exc.details()) from None
            raise

    async def release_for(self, ctx: TenantContext, lease_id: str, spent: Tokens) -> None:
        """Settle one of the tenant's leases with its final spend (idempotent: a settled lease stays settled)."""
        request = mpb.ReleaseTenantLeaseRequest(
            tenant_id=ctx.tenant_id, tier=tier_to_proto(ctx.tier), lease_id=lease_id, spent=_counts(spent)
        )
        try:
            await self._stub.ReleaseTenantLease(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _DOWN:
                raise BackendUnavailable(f"metering ReleaseTenantLease: {exc.code().name}") from None
            _gone_if_settled(exc)
            raise


_GONE = {"LEASE_EXPIRED", "LEASE_RELEASED", "LEASE_NOT_FOUND"}


def _gone_if_settled(exc: grpc.aio.AioRpcError) -> None:
    """Raise LeaseGone when metering says the lease is no longer open there (expired, settled, unknown)."""
    if (
        exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)
        and error_details(exc).get("reason") in _GONE
    ):
        raise LeaseGone(f"metering: {error_details(exc).get('reason')}") from None


def _refuse_if_denied(exc: grpc.aio.AioRpcError, scope: str) -> None:
    """A token that may not read its limits or hold budget must not get unlimited calls: refuse it."""
    if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        raise errors.PermissionDenied(
            f"model calls need a token that also holds {scope}",
            reason=errors.Reason.MISSING_SCOPE,
            metadata={"scope": scope},
        ) from None


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

    async def _fetch(self, attempts: int = 3) -> str | None:
        for attempt in range(attempts):
            try:
                resp = await self._stub.GetSecret(
                    credentials_pb2.GetSecretRequest(name=self._secret_name), timeout=self._timeout
                )
            except grpc.aio.AioRpcError as exc:
                # NOT_FOUND: no key of its own. PERMISSION_DENIED: this caller may not read it; the
                # platform key serves (never another tenant's: credentials only answers for the caller's).
                if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
                    return None
                # ABORTED: credentials lost a race appending to its audit chain; it asks for a retry.
                if exc.code() == grpc.StatusCode.ABORTED and attempt + 1 < attempts:
                    continue
                raise BackendUnavailable(f"credentials: {exc.code().name}") from None
            key = resp.value.decode()
            register_secret(key)
            return key
        return None


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

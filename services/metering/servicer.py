"""MeteringService handlers: proto in, domain call, proto out. Tenant comes only from the context."""

from __future__ import annotations

import dataclasses

from bulkhead.metering.v1 import metering_pb2 as pb
from bulkhead.metering.v1 import metering_pb2_grpc
from services.metering import periods, wire
from services.metering.budgets import BudgetLedger
from services.metering.ledger import UsageLedger
from services.metering.prices import PriceCache
from services.metering.pricing import format_usd, scaled_to_usd
from shared.config_audit import ConfigAudit
from shared.db import Database, answer_with_lsn, reads_after_caller
from shared.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from shared.ids import check_tenant_id
from shared.tenancy import PLATFORM_TENANT, TenantContext, acting_for, require_tenant
from shared.tiers import Tier, TierLookup, UnknownTier, tier_from_proto

_QUOTA_TABLES = {"metering_quotas", "metering_budgets"}


def _operator() -> TenantContext:
    """The calling operator; the interceptor checked the scope, this checks it is the platform tenant's."""
    ctx = require_tenant()
    if not ctx.is_operator:
        raise PermissionDenied("only platform operators may do this", reason="OPERATOR_ONLY")
    return ctx


def _target(tenant_id: str, field: str, *, required: bool) -> str:
    if not tenant_id and not required:
        return ""
    return check_tenant_id(tenant_id, field)


class MeteringTiers:
    """TierLookup for reads about another tenant: the tier its own calls showed metering, else identity's
    word, else pooled (a standalone metering, with no identity to ask)."""

    def __init__(self, usage: UsageLedger, tiers: TierLookup | None) -> None:
        self._usage, self._tiers = usage, tiers

    async def tier_of(self, tenant_id: str) -> Tier:
        known = (await self._usage.known_tenants()).get(tenant_id)
        if known is not None:
            return Tier.parse(known)
        return Tier.POOLED if self._tiers is None else await self._tiers.tier_of(tenant_id)


def _quota_detail(quota) -> dict[str, object]:
    """A Quota's limits for the audit (after wire.quota: nothing unparsed reaches it)."""
    return {
        "requests_per_minute": quota.requests_per_minute,
        "tokens_per_minute": quota.tokens_per_minute,
        "concurrent_calls": quota.concurrent_calls,
        "budgets": [f"{b.unit}:{b.limit}/{b.period}:{'hard' if b.hard else 'soft'}" for b in quota.budgets],
    }


class MeteringServicer(metering_pb2_grpc.MeteringServiceServicer):
    """Thin handlers over UsageLedger, BudgetLedger and PriceCache."""

    def __init__(
        self,
        usage: UsageLedger,
        budgets: BudgetLedger,
        prices: PriceCache,
        tiers: TierLookup | None = None,
        db: Database | None = None,
        *,
        audit: ConfigAudit,
    ):
        """tiers None: no identity to ask (a standalone metering), so an unseen tenant counts as pooled.
        db: where RecordUsage's WAL position comes from, for QueryUsage on a replica (read-your-writes)."""
        self._db = db
        self._usage = usage
        self._budgets = budgets
        self._prices = prices
        self._tiers = tiers
        self._audit = audit

    # ---------------------------------------------------------------- usage

    async def RecordUsage(self, request: pb.RecordUsageRequest, context) -> pb.RecordUsageResponse:
        recorded, duplicates = await self._usage.record(wire.usage_batch(request.events))
        if self._db is not None:
            await answer_with_lsn(self._db, context)
        return pb.RecordUsageResponse(recorded_count=recorded, duplicate_count=duplicates)

    async def RecordTenantUsage(self, request: pb.RecordTenantUsageRequest, context) -> pb.RecordTenantUsageResponse:
        target, tier = await self._platform_target(request.tenant_id, request.tier)
        batch = wire.usage_batch(request.events)
        with acting_for(target, tier=tier):
            recorded, duplicates = await self._usage.record(batch)
        return pb.RecordTenantUsageResponse(recorded_count=recorded, duplicate_count=duplicates)

    async def _platform_target(self, tenant_id: str, tier_value: int) -> tuple[str, Tier]:
        """The tenant a platform service acts for, and its tier (checked against the one already known)."""
        ctx = require_tenant()
        if ctx.tenant_id != PLATFORM_TENANT:  # the interceptor already refuses platform.* elsewhere
            raise PermissionDenied("only platform services may act for another tenant", reason="PLATFORM_ONLY")
        target = _target(tenant_id, "tenant_id", required=True)
        try:
            tier = tier_from_proto(tier_value)
        except UnknownTier:
            raise InvalidArgument(
                "unknown tier", reason="INVALID_TIER", violations={"tier": "TIER_POOLED, TIER_BRIDGE or TIER_SILO"}
            ) from None
        known = (await self._usage.known_tenants()).get(target)
        if known is not None and known != tier:
            # The tier decides where the rows go: a wrong one would file them where nobody looks.
            raise FailedPrecondition(f"tenant {target} is {known}-tier, not {tier}", reason="TIER_MISMATCH")
        return target, tier

    async def QueryUsage(self, request: pb.QueryUsageRequest, context) -> pb.QueryUsageResponse:
        with reads_after_caller(context):
            rows = await self._usage.query(wire.usage_query(request.filter, request.group_by))
        chunk, token = wire.page(rows, request.page_size, request.page_token, filters=_filters(request))
        return pb.QueryUsageResponse(rows=[wire.usage_row(r) for r in chunk], next_page_token=token)

    async def QueryTenantUsage(self, request: pb.QueryTenantUsageRequest, context) -> pb.QueryTenantUsageResponse:
        _operator()
        target = _target(request.tenant_id, "tenant_id", required=False)
        query = wire.usage_query(request.filter, request.group_by)
        self._usage.check(query)
        await self._usage.audit("QueryTenantUsage", target)
        rows = []
        for tenant_id, tier in await self._tenants(target):
            with acting_for(tenant_id, tier=tier):
                rows += await self._usage.query(query)
        chunk, token = wire.page(rows, request.page_size, request.page_token, filters=_filters(request))
        return pb.QueryTenantUsageResponse(rows=[wire.usage_row(r) for r in chunk], next_page_token=token)

    async def ExportChargeback(self, request: pb.ExportChargebackRequest, context) -> pb.ExportChargebackResponse:
        _operator()
        target = _target(request.tenant_id, "tenant_id", required=False)
        start = wire.micros(request.start_time, request.HasField("start_time"), "start_time")
        end = wire.micros(request.end_time, request.HasField("end_time"), "end_time")
        period = periods.DAY if request.period == pb.CHARGEBACK_PERIOD_DAY else periods.MONTH
        self._usage.check(self._usage.chargeback_query(start, end), prefix="")
        await self._usage.audit("ExportChargeback", target)
        lines, total = [], 0
        for tenant_id, tier in await self._tenants(target):
            with acting_for(tenant_id, tier=tier):
                for row in await self._usage.chargeback(start, end, period):
                    total += row.cost_scaled
                    lines.append(
                        pb.ChargebackLine(
                            tenant_id=row.tenant_id,
                            period_start=wire.timestamp(row.period_start_us or 0),
                            model=row.model,
                            event_count=row.event_count,
                            tokens=wire.token_counts(row.tokens),
                            cost_usd=format_usd(scaled_to_usd(row.cost_scaled)),
                        )
                    )
        return pb.ExportChargebackResponse(lines=lines, total_cost_usd=format_usd(scaled_to_usd(total)))

    async def _tier_of(self, tenant_id: str) -> Tier:
        """The tier a tenant's own calls showed metering, else identity's word for it."""
        known = (await self._usage.known_tenants()).get(tenant_id)
        if known is not None:
            return Tier.parse(known)
        if self._tiers is None:  # a standalone metering: no identity to ask
            return Tier.POOLED
        return await self._tiers.tier_of(tenant_id)

    async def _tenants(self, target: str) -> list[tuple[str, str]]:
        """(tenant, tier) of the tenants a report covers; an unseen target has no rows, so pooled reads none."""
        known = await self._usage.known_tenants()
        if target:
            return [(target, known.get(target, Tier.POOLED))]
        return list(known.items())

    # ---------------------------------------------------------------- prices

    async def SetPrice(self, request: pb.SetPriceRequest, context) -> pb.SetPriceResponse:
        _operator()
        price = wire.price(request.price)
        # Prices are the platform's: their changes go to the platform tenant's chain.
        async with self._audit.change(
            "price.set",
            tenant_id=PLATFORM_TENANT,
            tier=Tier.POOLED,
            target=f"price/{price.model}",
            tables={"metering_prices"},
            detail=dataclasses.asdict(price),
        ):
            stored = await self._prices.set(price)
        await self._usage.audit("SetPrice", "", f"model={stored.model}")
        return pb.SetPriceResponse(price=wire.price_msg(stored))

    async def ListPrices(self, request: pb.ListPricesRequest, context) -> pb.ListPricesResponse:
        book = await self._prices.book(fresh=True)
        prices = [
            p
            for model, versions in sorted(book.versions().items())
            for p in versions
            if not request.model or model == request.model
        ]
        chunk, token = wire.page(prices, request.page_size, request.page_token, filters=request.model)
        return pb.ListPricesResponse(prices=[wire.price_msg(p) for p in chunk], next_page_token=token)

    # ---------------------------------------------------------------- quotas

    async def SetQuota(self, request: pb.SetQuotaRequest, context) -> pb.SetQuotaResponse:
        _operator()
        target = _target(request.quota.tenant_id, "quota.tenant_id", required=True)
        await self._usage.audit("SetQuota", target)
        tier = await self._tier_of(target)
        quota = wire.quota(request.quota)
        async with self._audit.change(
            "quota.set",
            tenant_id=target,
            tier=tier,
            target=f"quota/{target}",
            tables=_QUOTA_TABLES,
            detail=_quota_detail(quota),
        ):
            with acting_for(target, tier=tier):
                stored = await self._budgets.set_quota(quota)
        await self._usage.note_tenant(target, tier=tier)
        return pb.SetQuotaResponse(quota=wire.quota_msg(stored))

    async def GetQuota(self, request: pb.GetQuotaRequest, context) -> pb.GetQuotaResponse:
        _operator()
        target = _target(request.tenant_id, "tenant_id", required=True)
        await self._usage.audit("GetQuota", target)
        tier = await self._tier_of(target)
        with acting_for(target, tier=tier):
            quota = await self._budgets.get_quota(target)
        return pb.GetQuotaResponse(quota=wire.quota_msg(quota))

    async def GetQuotaStatus(self, request: pb.GetQuotaStatusRequest, context) -> pb.GetQuotaStatusResponse:
        ctx = require_tenant()
        quota, states = await self._budgets.status(ctx.tenant_id)
        return pb.GetQuotaStatusResponse(quota=wire.quota_msg(quota), budgets=[wire.budget_status(s) for s in states])

    # ---------------------------------------------------------------- reservations and leases

    async def ReserveBudget(self, request: pb.ReserveBudgetRequest, context) -> pb.ReserveBudgetResponse:
        ctx = require_tenant()
        await self._usage.note_tenant(ctx.tenant_id, tier=ctx.tier)
        res = await self._budgets.reserve(
            ctx.tenant_id,
            model=request.model,
            prompt_tokens=request.prompt_tokens,
            max_output_tokens=request.max_output_tokens,
            ttl_seconds=request.ttl_seconds,
            idempotency_key=request.idempotency_key,
        )
        return pb.ReserveBudgetResponse(
            reservation_id=res.reservation_id,
            held=wire.hold(res.held),
            expire_time=wire.timestamp(res.expires_us),
            over_budget=res.over_budget,
        )

    async def CommitBudget(self, request: pb.CommitBudgetRequest, context) -> pb.CommitBudgetResponse:
        done = await self._budgets.commit(request.reservation_id, wire.tokens(request.usage))
        return pb.CommitBudgetResponse(charged=wire.hold(done.charged), released=wire.hold(done.released))

    async def ReleaseBudget(self, request: pb.ReleaseBudgetRequest, context) -> pb.ReleaseBudgetResponse:
        done = await self._budgets.release(request.reservation_id)
        return pb.ReleaseBudgetResponse(released=wire.hold(done.released))

    async def LeaseBudget(self, request: pb.LeaseBudgetRequest, context) -> pb.LeaseBudgetResponse:
        ctx = require_tenant()
        await self._usage.note_tenant(ctx.tenant_id, tier=ctx.tier)
        info = await self._budgets.lease(
            ctx.tenant_id,
            model=request.model,
            tokens=request.tokens,
            min_tokens=request.min_tokens,
            ttl_seconds=request.ttl_seconds,
            holder=request.holder,
        )
        return pb.LeaseBudgetResponse(lease=wire.lease(info))

    async def RenewLease(self, request: pb.RenewLeaseRequest, context) -> pb.RenewLeaseResponse:
        info = await self._budgets.renew_lease(
            request.lease_id, wire.tokens(request.spent), request.ttl_seconds, in_flight_tokens=request.in_flight_tokens
        )
        return pb.RenewLeaseResponse(lease=wire.lease(info))

    async def ReleaseLease(self, request: pb.ReleaseLeaseRequest, context) -> pb.ReleaseLeaseResponse:
        done = await self._budgets.release_lease(request.lease_id, wire.tokens(request.spent))
        return pb.ReleaseLeaseResponse(charged=wire.hold(done.charged), released=wire.hold(done.released))

    async def ReleaseTenantLease(self, request: pb.ReleaseTenantLeaseRequest, context) -> pb.ReleaseTenantLeaseResponse:
        target, tier = await self._platform_target(request.tenant_id, request.tier)
        with acting_for(target, tier=tier):
            done = await self._budgets.release_lease(request.lease_id, wire.tokens(request.spent))
        return pb.ReleaseTenantLeaseResponse(charged=wire.hold(done.charged), released=wire.hold(done.released))


def _filters(request) -> str:
    """What a usage query's page token is bound to: the request without its paging fields."""
    bare = type(request)()
    bare.CopyFrom(request)
    bare.ClearField("page_size")
    bare.ClearField("page_token")
    return bare.SerializeToString(deterministic=True).hex()

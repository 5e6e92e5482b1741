"""The usage ledger: idempotent recording, priced reports, and operator reads across tenants."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from services.metering import periods, rollup, store
from services.metering.meters import MeteringMetrics
from services.metering.prices import PriceCache
from services.metering.pricing import Tokens, scaled_to_usd
from services.metering.usage import (
    DAY,
    MODEL,
    UsageBatch,
    UsageQuery,
    UsageRecord,
    UsageTotal,
    batch_problems,
    first_of_each_key,
    fold_into_months,
    total,
    validate_query,
)
from shared.errors import InvalidArgument
from shared.tenancy import require_tenant
from shared.tiers import Tier

log = logging.getLogger("bulkhead.metering")

_OUTCOMES = {0: "success", 1: "success", 2: "error", 3: "rejected", 4: "cancelled"}


class UsageLedger:
    """Records and reports the usage of the tenant in the current TenantContext."""

    def __init__(self, db, prices: PriceCache, metrics: MeteringMetrics, *, clock: Callable[[], int] = periods.now_us):
        self._db = db
        self._prices = prices
        self._metrics = metrics
        self._clock = clock
        self._noted: set[str] = set()

    async def note_tenant(self, tenant_id: str, *, tier: Tier | str) -> None:
        """Remember a tenant and its tier so operators' reports find its rows (once per process)."""
        if tenant_id in self._noted:
            return
        async with self._db.system_session() as s:
            await store.note_tenant(s, tenant_id, Tier.parse(tier).value, self._clock())
        self._noted.add(tenant_id)

    async def record(self, records: Sequence[UsageRecord] | UsageBatch) -> tuple[int, int]:
        """Store a batch; returns (recorded, duplicates). An invalid batch writes nothing."""
        batch = records if isinstance(records, UsageBatch) else UsageBatch.from_records(records)
        if problems := batch_problems(batch):
            raise InvalidArgument("invalid usage batch", reason="INVALID_USAGE", violations=problems)
        ctx = require_tenant()
        unique = first_of_each_key(batch)
        async with self._db.raw(write=True) as tx:
            new_keys = await rollup.insert(tx, ctx.tenant_id, unique, self._clock(), default_principal=ctx.principal_id)
        await self.note_tenant(ctx.tenant_id, tier=ctx.tier)
        if new_keys:
            await self._count(ctx.tenant_id, unique.only(new_keys))
        return len(new_keys), len(batch) - len(new_keys)

    async def _count(self, tenant_id: str, batch: UsageBatch) -> None:
        """Add new events to the Prometheus counters, summed per model and outcome first (cheap for big batches)."""
        book = await self._prices.book()
        # [calls, input, output, cache write, cache read] per model and outcome.
        sums = batch.sums_by(zip(batch.models, batch.outcomes, strict=True))
        # Cost is linear in tokens: a model whose events all fall in one price version is priced on its sums.
        if len({model for model, _ in sums}) == 1:
            spans = {batch.models[0]: (min(batch.occurred_us), max(batch.occurred_us))}
        else:
            spans = {}
            for model, at in zip(batch.models, batch.occurred_us, strict=True):
                low, high = spans.get(model, (at, at))
                spans[model] = (min(low, at), max(high, at))
        one_price = {m: book.price_at(m, low) for m, (low, high) in spans.items()}
        one_price = {m: p for m, p in one_price.items() if p is book.price_at(m, spans[m][1])}
        cost: dict[tuple[str, int], int] = {}
        for model, outcome, at, i, o, cw, cr in zip(
            batch.models,
            batch.outcomes,
            batch.occurred_us,
            batch.inputs,
            batch.outputs,
            batch.cache_writes,
            batch.cache_reads,
            strict=True,
        ):
            if model not in one_price and (price := book.price_at(model, at)) is not None:
                cost[(model, outcome)] = cost.get((model, outcome), 0) + price.cost_scaled(Tokens(i, o, cw, cr))
        for (model, outcome), (count, i, o, cw, cr) in sums.items():
            tokens = Tokens(i, o, cw, cr)
            price = one_price.get(model)
            scaled = price.cost_scaled(tokens) if price is not None else cost.get((model, outcome), 0)
            self._metrics.recorded(
                tenant_id, model, _OUTCOMES.get(outcome, "other"), tokens, float(scaled_to_usd(scaled)), count=count
            )

    @staticmethod
    def check(query: UsageQuery, *, prefix: str = "filter") -> None:
        """Raise InvalidArgument when a query is malformed (before any tenant is read)."""
        if problems := validate_query(query, prefix):
            raise InvalidArgument("invalid usage query", reason="INVALID_QUERY", violations=problems)

    async def query(self, query: UsageQuery, *, prefix: str = "filter") -> list[UsageTotal]:
        """The tenant's usage rows, each event priced at its own time."""
        self.check(query, prefix=prefix)
        book = await self._prices.book(fresh=True)
        async with self._db.read_session() as s:  # a replica, when configured
            partials = await rollup.sum_usage(
                s, query, book.versions(), pruned_before_hour=await store.pruned_before_hour(s)
            )
        return total(partials, tenant_id=require_tenant().tenant_id, group_by=query.group_by, book=book)

    @staticmethod
    def chargeback_query(start_us: int, end_us: int) -> UsageQuery:
        """The query behind chargeback lines (checked with check(..., prefix=""))."""
        return UsageQuery(start_us, end_us, (MODEL, DAY))

    async def chargeback(self, start_us: int, end_us: int, period: str) -> list[UsageTotal]:
        """The tenant's lines per period and model (period: periods.DAY or periods.MONTH)."""
        rows = await self.query(self.chargeback_query(start_us, end_us), prefix="")
        return rows if period == periods.DAY else fold_into_months(rows)

    async def known_tenants(self) -> dict[str, str]:
        """Every tenant with metering data, and its tier."""
        async with self._db.system_session() as s:
            return await store.known_tenants(s)

    async def audit(self, method: str, target_tenant: str, detail: str = "") -> None:
        """Record an operator action on tenant data (and log it; no secrets here, only ids)."""
        operator = require_tenant()
        async with self._db.system_session() as s:
            await store.add_audit(
                s,
                operator_id=operator.principal_id,
                request_id=operator.request_id,
                method=method,
                target_tenant=target_tenant or "*",
                detail=detail,
                now_us=self._clock(),
            )
        log.info(
            "operator %s called %s on tenant %s",
            operator.principal_id,
            method,
            target_tenant or "*",
            extra={"audit": True, "target_tenant": target_tenant or "*"},
        )

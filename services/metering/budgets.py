"""Exact budgets: quotas, reservations and leases (the domain rules; SQL lives in store.py).

Every hold (a reservation or a lease) adds to a counter's `held` through one conditional UPDATE
that refuses to pass a hard limit, and settling it moves `held` into `used` in the same
transaction that marks the hold settled. A hold that is never settled expires: a sweep (run
lazily when a reservation is refused, on status reads, and periodically) charges what a lease
last reported and returns the rest, so a crashed caller cannot strand budget.
"""
from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable

from sqlalchemy.exc import IntegrityError

from services.metering import periods, store
from services.metering.prices import PriceCache
from services.metering.pricing import Price, Tokens
from services.metering.quotas import (
    MICRO_USD,
    TOKENS,
    UNITS,
    Amounts,
    BudgetSpec,
    BudgetState,
    LeaseInfo,
    Quota,
    Reservation,
    Settlement,
    validate_quota,
)
from shared.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

RESERVATION = "reservation"
LEASE = "lease"
OPEN, COMMITTED, RELEASED, EXPIRED = "open", "committed", "released", "expired"

DEFAULT_RESERVATION_TTL_S = 300
DEFAULT_LEASE_TTL_S = 60
MAX_TTL_S = 3600


class _OverBudget(Exception):
    """A hard budget cannot hold an amount (rolls the transaction back)."""

    def __init__(self, spec: BudgetSpec, needed: int):
        super().__init__(spec.unit)
        self.spec = spec
        self.needed = needed


class _Raced(Exception):
    """The counter moved between our read and our update: try again."""


def _rates(price: Price | None) -> dict[str, int]:
    """A hold's copy of its price's rates (zero for an unpriced model)."""
    if price is None:
        return {"rate_input": 0, "rate_output": 0, "rate_cache_write": 0, "rate_cache_read": 0}
    return {"rate_input": price.input, "rate_output": price.output, "rate_cache_write": price.cache_write,
            "rate_cache_read": price.cache_read}


def _ttl(value: int, default: int, field: str) -> int:
    if value == 0:
        return default
    if not 0 < value <= MAX_TTL_S:
        raise InvalidArgument(f"{field} must be between 1 and {MAX_TTL_S}", reason="INVALID_TTL",
                              violations={field: f"between 1 and {MAX_TTL_S} seconds"})
    return value


class BudgetLedger:
    """Quotas and holds of the tenant in the current TenantContext."""

    def __init__(self, db, prices: PriceCache, *, clock: Callable[[], int] = periods.now_us,
                 on_reject: Callable[[str, str, str], None] | None = None):
        self._db = db
        self._prices = prices
        self._clock = clock
        self._on_reject = on_reject or (lambda tenant, model, reason: None)
        # SQLite cannot upgrade a reading transaction to a writing one while another writer is
        # active ("database is locked"); the embedded single-process deployment queues them here.
        self._sqlite_writes = asyncio.Lock() if db.dialect == "sqlite" else None

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator:
        if self._sqlite_writes is None:
            async with self._db.session() as s:
                yield s
            return
        async with self._sqlite_writes, self._db.session() as s:
            yield s

    # ------------------------------------------------------------ quotas

    async def set_quota(self, quota: Quota) -> Quota:
        """Replace the tenant's quota (the caller has scoped the context to quota.tenant_id)."""
        if problems := validate_quota(quota):
            raise InvalidArgument("invalid quota", reason="INVALID_QUOTA", violations=problems)
        now = self._clock()
        async with self._session() as s:
            await store.replace_quota(
                s, quota.tenant_id, rpm=quota.requests_per_minute, tpm=quota.tokens_per_minute,
                concurrent=quota.concurrent_calls,
                budgets=[(b.unit, b.limit, b.period, b.hard) for b in quota.budgets], now_us=now)
        return await self.get_quota(quota.tenant_id)

    async def get_quota(self, tenant_id: str) -> Quota:
        """The tenant's quota (all zero and no budgets when none was set)."""
        async with self._session() as s:
            row, budgets = await store.get_quota(s)
        specs = tuple(BudgetSpec(b.unit, b.limit_amount, b.period, b.hard) for b in budgets)
        if row is None:
            return Quota(tenant_id=tenant_id, budgets=specs)
        return Quota(tenant_id, row.requests_per_minute, row.tokens_per_minute, row.concurrent_calls, specs,
                     row.updated_us)

    async def status(self, tenant_id: str) -> tuple[Quota, list[BudgetState]]:
        """The quota with each budget's used, held and remaining in the current period."""
        await self.sweep()
        quota = await self.get_quota(tenant_id)
        now = self._clock()
        states = []
        async with self._session() as s:
            for spec in quota.budgets:
                start, end = periods.bounds(spec.period, now)
                counter = await store.get_counter(s, spec.unit, start)
                states.append(BudgetState(spec, start, end, counter.used, counter.held))
        return quota, states

    # ------------------------------------------------------------ reservations

    async def reserve(self, tenant_id: str, *, model: str, prompt_tokens: int, max_output_tokens: int,
                      ttl_seconds: int = 0, idempotency_key: str = "") -> Reservation:
        """Hold the worst case of a call, or raise ResourceExhausted when a hard budget cannot hold it."""
        problems = {}
        if not model:
            problems["model"] = "required"
        if prompt_tokens < 0:
            problems["prompt_tokens"] = "cannot be negative"
        if max_output_tokens < 0:
            problems["max_output_tokens"] = "cannot be negative"
        if prompt_tokens + max_output_tokens <= 0 and not problems:
            problems["max_output_tokens"] = "a call must hold at least one token"
        if len(idempotency_key) > 200:
            problems["idempotency_key"] = "at most 200 characters"
        if problems:
            raise InvalidArgument("invalid reservation", reason="INVALID_RESERVATION", violations=problems)
        ttl = _ttl(ttl_seconds, DEFAULT_RESERVATION_TTL_S, "ttl_seconds")
        price = await self._prices.current(model)
        amounts = Amounts(prompt_tokens + max_output_tokens,
                          price.worst_case_micros(prompt_tokens, max_output_tokens) if price else 0)
        for attempt in range(3):
            try:
                return await self._reserve_once(tenant_id, model, amounts, price, ttl, idempotency_key)
            except _OverBudget as over:
                if attempt == 0 and await self.sweep():
                    continue  # expired holds were returned: the budget may fit now
                raise await self._exhausted(tenant_id, model, over) from None
            except IntegrityError:
                continue  # a concurrent retry with the same key won: read its reservation
        raise FailedPrecondition("reservation could not be made", reason="RESERVATION_CONFLICT")

    async def _reserve_once(self, tenant_id: str, model: str, amounts: Amounts, price: Price | None, ttl: int,
                            key: str) -> Reservation:
        now = self._clock()
        async with self._session() as s:
            if key and (existing := await store.get_hold_by_key(s, key)) is not None:
                return Reservation(existing.hold_id, Amounts(existing.tokens_held, existing.micros_held),
                                   existing.expires_us, existing.over_budget)
            budgets = await store.get_budgets(s)
            if budgets.get(MICRO_USD) is not None and price is None:
                raise FailedPrecondition(f"model {model!r} has no price, so a money budget cannot hold it",
                                         reason="MODEL_NOT_PRICED")
            specs = {u: BudgetSpec(r.unit, r.limit_amount, r.period, r.hard) for u, r in budgets.items()}
            period_of = {u: periods.bounds(specs[u].period if u in specs else periods.MONTH, now)[0] for u in UNITS}
            hold = store.HoldRow(
                tenant_id=tenant_id, hold_id="res_" + secrets.token_urlsafe(16), kind=RESERVATION, model=model,
                idempotency_key=key or None, tokens_held=amounts.tokens, micros_held=amounts.micro_usd,
                tokens_period_us=period_of[TOKENS], micros_period_us=period_of[MICRO_USD],
                priced_at_us=price.effective_us if price else 0, **_rates(price), state=OPEN, over_budget=False,
                created_us=now, expires_us=now + ttl * periods.US_PER_SECOND, settled_us=0,
                spent_input=0, spent_output=0, spent_cache_write=0, spent_cache_read=0,
                charged_tokens=0, charged_micros=0)
            # The hold row first, the counters last: the hot counter row stays locked only
            # from its UPDATE to COMMIT, which is what bounds one tenant's reservation rate.
            await store.add_hold(s, hold)
            over_budget = await self._hold_counters(s, tenant_id, specs, period_of, amounts, _OverBudget)
            if over_budget:
                await store.flag_over_budget(s, hold.hold_id)
        return Reservation(hold.hold_id, amounts, hold.expires_us, over_budget)

    @staticmethod
    async def _hold_counters(s, tenant_id: str, specs: dict[str, BudgetSpec], period_of: dict[str, int],
                             amounts: Amounts, refused: Callable[[BudgetSpec, int], Exception]) -> bool:
        """Add amounts to each unit's counter within hard limits; True when a soft limit is passed.

        Raises refused(spec, amount) (rolling the transaction back) when a hard limit cannot hold it.
        """
        wanted = {TOKENS: amounts.tokens, MICRO_USD: amounts.micro_usd}
        changes = [store.CounterChange(unit, period_of[unit], hold=amount,
                                       limit=specs[unit].limit if unit in specs and specs[unit].hard else None)
                   for unit, amount in wanted.items()]
        states, refused_units = await store.try_hold(s, tenant_id, changes)
        if refused_units:
            unit = refused_units[0]
            raise refused(specs[unit], wanted[unit])
        return any(not spec.hard and unit in states and states[unit].used + states[unit].held > spec.limit
                   for unit, spec in specs.items())

    async def _exhausted(self, tenant_id: str, model: str, over: _OverBudget) -> ResourceExhausted:
        now = self._clock()
        start, end = periods.bounds(over.spec.period, now)
        async with self._session() as s:
            counter = await store.get_counter(s, over.spec.unit, start)
            soonest = await store.next_expiry(s)
        remaining = max(0, over.spec.limit - counter.used - counter.held)
        # Held budget comes back when holds settle or expire; otherwise only the next period helps.
        wait_us = (soonest - now) if soonest is not None and soonest > now and counter.held else end - now
        self._on_reject(tenant_id, model, f"budget_{over.spec.unit}")
        return ResourceExhausted(
            f"{over.spec.unit} budget exhausted: needs {over.needed}, {remaining} of {over.spec.limit} remain "
            f"this {over.spec.period}",
            reason="BUDGET_EXHAUSTED",
            metadata={"unit": over.spec.unit, "limit": str(over.spec.limit), "remaining": str(remaining)},
            violations=[(f"budget:{over.spec.unit}",
                         f"needs {over.needed}; used {counter.used}, held {counter.held}, limit {over.spec.limit}")],
            retry_after=max(wait_us, 0) / periods.US_PER_SECOND)

    async def commit(self, reservation_id: str, usage: Tokens) -> Settlement:
        """Charge a reservation's real usage and release the rest."""
        return await self._settle(reservation_id, RESERVATION, usage, COMMITTED)

    async def release(self, reservation_id: str) -> Settlement:
        """Drop a reservation, charging nothing."""
        return await self._settle(reservation_id, RESERVATION, Tokens(), RELEASED)

    async def _settle(self, hold_id: str, kind: str, spent: Tokens, new_state: str) -> Settlement:
        what = "reservation" if kind == RESERVATION else "lease"
        field = "usage" if kind == RESERVATION else "spent"
        if not hold_id:
            raise InvalidArgument(f"{what} id is required", reason="INVALID_ARGUMENT",
                                  violations={f"{what}_id": "required"})
        if min(spent.parts()) < 0:
            raise InvalidArgument("token counts cannot be negative", reason="INVALID_USAGE",
                                  violations={field: "token counts cannot be negative"})
        async with self._session() as s:
            # The common case in one statement: claim the open hold and price its spend.
            hold = await store.settle_open_hold(s, hold_id, kind, new_state, spent, self._clock())
            if hold is None:
                return await self._why_not_settled(s, hold_id, kind, spent, new_state, what, field)
            charged = Amounts(hold.charged_tokens, hold.charged_micros)
            await self._apply_settlement(s, hold, charged)
        return Settlement(charged, Amounts(hold.tokens_held - charged.tokens, hold.micros_held - charged.micro_usd))

    async def _why_not_settled(self, s, hold_id: str, kind: str, spent: Tokens, new_state: str, what: str,
                               field: str) -> Settlement:
        """A hold the settling UPDATE did not take: missing, already settled, or spent too much."""
        hold = await store.get_hold(s, hold_id, kind)
        if hold is None:
            raise NotFound(f"{what} not found", reason=f"{what.upper()}_NOT_FOUND")
        if hold.state != OPEN:
            return self._settled_again(hold, spent, new_state, what)
        raise InvalidArgument(
            f"{field} exceeds what was held ({hold.tokens_held} tokens, {hold.micros_held} micro-USD)",
            reason="EXCEEDS_HOLD", violations={field: "more than was held"})

    def _settled_again(self, hold: store.HoldRow, spent: Tokens, new_state: str, what: str) -> Settlement:
        """A repeated settle with the same outcome returns the first result; anything else is refused."""
        if hold.state == new_state and hold.spent == spent:
            charged = Amounts(hold.charged_tokens, hold.charged_micros)
            return Settlement(charged, Amounts(hold.tokens_held - charged.tokens, hold.micros_held - charged.micro_usd))
        raise FailedPrecondition(f"{what} is already {hold.state}", reason=f"{what.upper()}_{hold.state.upper()}")

    @staticmethod
    def _cost_micros(hold: store.HoldRow, spent: Tokens) -> int:
        """Spend priced at the rates the hold was made with, rounded up to whole micro-USD."""
        rates = Price(hold.model, hold.priced_at_us, hold.rate_input, hold.rate_output, hold.rate_cache_write,
                      hold.rate_cache_read)
        return rates.cost_micros_ceil(spent)

    @staticmethod
    def _check_within(hold: store.HoldRow, spent: Tokens, charged: Amounts, field: str) -> None:
        if charged.tokens > hold.tokens_held or charged.micro_usd > hold.micros_held:
            raise InvalidArgument(
                f"{field} exceeds what was held ({hold.tokens_held} tokens, {hold.micros_held} micro-USD)",
                reason="EXCEEDS_HOLD", violations={field: "more than was held"})

    @staticmethod
    async def _apply_settlement(s, hold: store.HoldRow, charged: Amounts) -> None:
        await store.settle_counters(s, hold.tenant_id, [
            store.CounterChange(TOKENS, hold.tokens_period_us, release=hold.tokens_held, charge=charged.tokens),
            store.CounterChange(MICRO_USD, hold.micros_period_us, release=hold.micros_held,
                                charge=charged.micro_usd)])

    async def sweep(self) -> int:
        """Expire the tenant's overdue holds: charge what leases reported, return the rest. Returns how many."""
        async with self._session() as s:
            expired = await store.expire_holds(s, self._clock())
            for hold in expired:
                await self._apply_settlement(s, hold, Amounts(hold.charged_tokens, hold.charged_micros))
        return len(expired)

    # ------------------------------------------------------------ leases

    async def lease(self, tenant_id: str, *, model: str, tokens: int, min_tokens: int = 0,
                    ttl_seconds: int = 0) -> LeaseInfo:
        """Grant up to `tokens` (at least min_tokens) for local spending, or raise ResourceExhausted."""
        problems = {}
        if not model:
            problems["model"] = "required"
        if tokens <= 0:
            problems["tokens"] = "must be positive"
        if min_tokens < 0 or min_tokens > max(tokens, 0):
            problems["min_tokens"] = "between 0 and tokens"
        if problems:
            raise InvalidArgument("invalid lease", reason="INVALID_LEASE", violations=problems)
        ttl = _ttl(ttl_seconds, DEFAULT_LEASE_TTL_S, "ttl_seconds")
        price = await self._prices.current(model)
        for attempt in range(8):
            try:
                return await self._lease_once(tenant_id, model, tokens, min_tokens or tokens, price, ttl)
            except _Raced:
                continue
            except _OverBudget as over:
                if attempt == 0 and await self.sweep():
                    continue
                raise await self._exhausted(tenant_id, model, over) from None
        raise FailedPrecondition("budget is too contended to lease right now", reason="LEASE_CONTENDED")

    async def _lease_once(self, tenant_id: str, model: str, wanted: int, least: int, price: Price | None,
                          ttl: int) -> LeaseInfo:
        now = self._clock()
        rate = price.worst_rate() if price else 0
        async with self._session() as s:
            budgets = await store.get_budgets(s)
            if budgets.get(MICRO_USD) is not None and price is None:
                raise FailedPrecondition(f"model {model!r} has no price, so a money budget cannot lease it",
                                         reason="MODEL_NOT_PRICED")
            specs = {u: BudgetSpec(r.unit, r.limit_amount, r.period, r.hard) for u, r in budgets.items()}
            period_of = {u: periods.bounds(specs[u].period if u in specs else periods.MONTH, now)[0] for u in UNITS}
            grant = wanted
            for unit in UNITS:
                spec = specs.get(unit)
                if spec is None or not spec.hard:
                    continue
                counter = await store.get_counter(s, unit, period_of[unit])
                left = max(0, spec.limit - counter.used - counter.held)
                fits = left if unit == TOKENS else (left * 1_000_000 // rate if rate else wanted)
                if fits < least:
                    raise _OverBudget(spec, least if unit == TOKENS else -(-least * rate // 1_000_000))
                grant = min(grant, fits)
            amounts = Amounts(grant, -(-grant * rate // 1_000_000))
            hold = store.HoldRow(
                tenant_id=tenant_id, hold_id="lease_" + secrets.token_urlsafe(16), kind=LEASE, model=model,
                idempotency_key=None, tokens_held=amounts.tokens, micros_held=amounts.micro_usd,
                tokens_period_us=period_of[TOKENS], micros_period_us=period_of[MICRO_USD],
                priced_at_us=price.effective_us if price else 0, **_rates(price), state=OPEN, over_budget=False,
                created_us=now,
                expires_us=now + ttl * periods.US_PER_SECOND, settled_us=0, spent_input=0, spent_output=0,
                spent_cache_write=0, spent_cache_read=0, charged_tokens=0, charged_micros=0)
            await store.add_hold(s, hold)
            await self._hold_counters(s, tenant_id, specs, period_of, amounts, lambda spec, amount: _Raced())
        return LeaseInfo(hold.hold_id, model, amounts, Tokens(), hold.expires_us)

    async def renew_lease(self, lease_id: str, spent: Tokens, ttl_seconds: int = 0) -> LeaseInfo:
        """Record a lease's running spend and extend it."""
        if not lease_id:
            raise InvalidArgument("lease id is required", reason="INVALID_ARGUMENT",
                                  violations={"lease_id": "required"})
        ttl = _ttl(ttl_seconds, DEFAULT_LEASE_TTL_S, "ttl_seconds")
        now = self._clock()
        async with self._session() as s:
            hold = await store.get_hold(s, lease_id, LEASE)
            if hold is None:
                raise NotFound("lease not found", reason="LEASE_NOT_FOUND")
            if hold.state != OPEN or hold.expires_us < now:
                state = hold.state if hold.state != OPEN else EXPIRED
                raise FailedPrecondition(f"lease is {state}", reason=f"LEASE_{state.upper()}")
            if any(now_ < then for now_, then in zip(spent.parts(), hold.spent.parts(), strict=True)):
                raise InvalidArgument("spent is a running total and cannot go down", reason="SPEND_DECREASED",
                                      violations={"spent": "less than already reported"})
            charged = Amounts(spent.total, self._cost_micros(hold, spent))
            self._check_within(hold, spent, charged, "spent")
            expires = now + ttl * periods.US_PER_SECOND
            if not await store.renew_hold(s, lease_id, {
                    "expires_us": expires, "spent_input": spent.input, "spent_output": spent.output,
                    "spent_cache_write": spent.cache_write, "spent_cache_read": spent.cache_read,
                    "charged_tokens": charged.tokens, "charged_micros": charged.micro_usd}, now):
                raise FailedPrecondition("lease was settled concurrently", reason="CONCURRENT_SETTLEMENT")
        return LeaseInfo(lease_id, hold.model, Amounts(hold.tokens_held, hold.micros_held), spent, expires)

    async def release_lease(self, lease_id: str, spent: Tokens) -> Settlement:
        """Charge a lease's final spend and return the rest."""
        return await self._settle(lease_id, LEASE, spent, RELEASED)

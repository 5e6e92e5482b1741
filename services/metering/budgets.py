"""Exact budgets: quotas, reservations and leases (the domain rules; SQL lives in budget_sql.py and store.py).

Every hold (a reservation or a lease) adds to its counters' `held` through one conditional
statement that refuses to pass a hard limit, and settling it moves `held` into `used` in the
same statement that marks the hold settled (budget_sql.py says how, and in which lock order). A
hold that is never settled expires: a sweep (run lazily when a reservation is refused, on status
reads, and periodically) charges what a lease last reported and returns the rest, so a crashed
caller cannot strand budget.

Leases are meant to be short and renewed by a heartbeat while their holder lives (the proxy takes
them for 6 s and renews every 2 s), so a killed holder's leases come back within seconds rather
than stranding budget that calls elsewhere are refused for. Each renewal also reports the tokens
the holder's calls in flight hold; an expiring lease charges them on top of its spend (up to the
grant), as those calls may have been billed: `used` errs high, never low, like the proxy's
write-ahead attempts that settle at their reservation. A lease names its holder (the process)
for operators; the name grants nothing, the lease id does.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import string
import time
from collections.abc import AsyncIterator, Callable, Sequence

from services.metering import budget_sql, periods, store
from services.metering.budget_sql import CounterState, NewHold, UnitHold
from services.metering.group import GroupCommit
from services.metering.prices import PriceCache
from services.metering.pricing import MAX_TOKENS, TOKENS_PER_PRICE_UNIT, Price, Tokens, count_problems, tokens_problems
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
from shared.cache import TenantCache
from shared.db.raw import RawTransaction
from shared.errors import (
    BulkheadError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Reason,
    ResourceExhausted,
)
from shared.tenancy import require_tenant

RESERVATION = "reservation"
LEASE = "lease"
OPEN, COMMITTED, RELEASED, EXPIRED = "open", "committed", "released", "expired"
_NOT_FOUND = {RESERVATION: Reason.RESERVATION_NOT_FOUND, LEASE: Reason.LEASE_NOT_FOUND}
_SETTLED = {
    (RESERVATION, COMMITTED): Reason.RESERVATION_COMMITTED,
    (RESERVATION, RELEASED): Reason.RESERVATION_RELEASED,
    (RESERVATION, EXPIRED): Reason.RESERVATION_EXPIRED,
    (LEASE, RELEASED): Reason.LEASE_RELEASED,
    (LEASE, EXPIRED): Reason.LEASE_EXPIRED,
}
"""(kind, state) of a hold no longer open -> the reason a settle or renew of it is refused with."""

DEFAULT_RESERVATION_TTL_S = 300
DEFAULT_LEASE_TTL_S = 60
MAX_TTL_S = 3600
MAX_HOLDER = 200
_HOLDER_CHARS = frozenset(string.printable) - frozenset(string.whitespace) | {" "}

Specs = dict[str, BudgetSpec]
_ReserveItem = tuple[str, NewHold, tuple[UnitHold, UnitHold], tuple[int | None, int | None]]
"""A reservation to place: (tenant, hold, its counter moves, the soft limits of tokens and micro_usd)."""
_SettleItem = tuple[str, str, str, str, Tokens, int]
"""A hold to settle: (tenant, hold id, kind, new state, spent, now)."""


def budget_spec_cache(
    max_age_s: float = 2.0, *, max_tenants: int = 10_000, clock: Callable[[], float] = time.monotonic
) -> TenantCache[Specs]:
    """Each tenant's budget specs, kept briefly so a reservation need not read them every time (0 keeps nothing).

    Only the specs (unit, limit, period, hard/soft) are kept, never the counters: used and held are
    read and moved in the database by every hold. A SetQuota on this replica drops its tenant's
    entry at once. Staleness bound across replicas: another replica's SetQuota is seen here within
    max_age, so for that long this replica may still hold against the old limits and periods.
    """
    return TenantCache(max_age_s, max_entries=max_tenants, clock=clock)


class _OverBudget(Exception):
    """A hard budget cannot hold an amount (rolls the transaction back)."""

    def __init__(self, spec: BudgetSpec, needed: int):
        super().__init__(spec.unit)
        self.spec = spec
        self.needed = needed


class _Raced(Exception):
    """The counter moved between our read and our update: try again."""


def _new_reservation(model: str, key: str, price: Price | None, now: int, ttl: int) -> NewHold:
    """A reservation to place now for ttl seconds, priced at price's rates (a fresh hold id)."""
    return NewHold(
        hold_id="res_" + secrets.token_urlsafe(16),
        kind=RESERVATION,
        model=model,
        idempotency_key=key or None,
        priced_at_us=price.effective_us if price else 0,
        rates=_rates(price),
        created_us=now,
        expires_us=now + ttl * periods.US_PER_SECOND,
    )


def _rates(price: Price | None) -> tuple[int, int, int, int]:
    """A hold's copy of its price's rates (zero for an unpriced model)."""
    if price is None:
        return 0, 0, 0, 0
    return price.input, price.output, price.cache_write, price.cache_read


def _ttl(value: int, default: int, field: str) -> int:
    if value == 0:
        return default
    if not 0 < value <= MAX_TTL_S:
        raise InvalidArgument(
            f"{field} must be between 1 and {MAX_TTL_S}",
            reason="INVALID_TTL",
            violations={field: f"between 1 and {MAX_TTL_S} seconds"},
        )
    return value


def _period_starts(specs: Specs, now_us: int) -> dict[str, int]:
    """The current period start of each unit's counter (monthly where no budget says otherwise)."""
    return {u: periods.bounds(specs[u].period if u in specs else periods.MONTH, now_us)[0] for u in UNITS}


def _unit_holds(specs: Specs, starts: dict[str, int], amounts: Amounts) -> tuple[UnitHold, UnitHold]:
    """What a hold adds to each counter, in lock order (tokens, then micro_usd), with its hard limit."""

    def unit_hold(unit: str, amount: int) -> UnitHold:
        spec = specs.get(unit)
        return UnitHold(unit, starts[unit], amount, spec.limit if spec is not None and spec.hard else None)

    return unit_hold(TOKENS, amounts.tokens), unit_hold(MICRO_USD, amounts.micro_usd)


def _exceeds(hold: budget_sql.Hold, field: str) -> InvalidArgument:
    """A spend larger than what the hold holds, in tokens or money."""
    return InvalidArgument(
        f"{field} exceeds what was held ({hold.tokens_held} tokens, {hold.micros_held} micro-USD)",
        reason="EXCEEDS_HOLD",
        violations={field: "more than was held"},
    )


class BudgetLedger:
    """Quotas and holds of the tenant in the current TenantContext."""

    def __init__(
        self,
        db,
        prices: PriceCache,
        *,
        clock: Callable[[], int] = periods.now_us,
        on_reject: Callable[[str, str, str], None] | None = None,
        specs: TenantCache[Specs] | None = None,
    ):
        self._db = db
        self._prices = prices
        self._clock = clock
        self._on_reject = on_reject or (lambda tenant, model, reason: None)
        self._specs: TenantCache[Specs] = specs if specs is not None else budget_spec_cache()
        # SQLite cannot upgrade a reading transaction to a writing one while another writer is
        # active ("database is locked"); the embedded single-process deployment queues them here.
        self._sqlite_writes = asyncio.Lock() if db.dialect == "sqlite" else None
        # Postgres reserves and settles through migration 0008's functions: one round trip each, no BEGIN/COMMIT,
        # and those of one tenant that arrive while one is in flight share the next round trip (group commit).
        self._one_trip = db.dialect == "postgresql"
        # A shared call that Postgres refused (a hold over its hard limit, a deadlock) rolled back whole: each of
        # its calls then runs alone. A lost connection (UNAVAILABLE, outcome unknown) reaches every caller instead.
        self._reserving: GroupCommit[_ReserveItem, budget_sql.Reserved | str] = GroupCommit(
            self._reserve_one, self._reserve_many, budget_sql.refused_whole
        )
        self._settling: GroupCommit[_SettleItem, budget_sql.Settled | None] = GroupCommit(
            self._settle_one, self._settle_many, budget_sql.refused_whole
        )

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator:
        if self._sqlite_writes is None:
            async with self._db.session() as s:
                yield s
            return
        async with self._sqlite_writes, self._db.session() as s:
            yield s

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[RawTransaction]:
        """A raw writing transaction (the hot path: no ORM)."""
        if self._sqlite_writes is None:
            async with self._db.raw(write=True) as tx:
                yield tx
            return
        async with self._sqlite_writes, self._db.raw(write=True) as tx:
            yield tx

    async def _budget_specs(self, tx: RawTransaction, tenant_id: str) -> Specs:
        """The tenant's budget specs: from the cache, else read in tx (and kept)."""
        hit, specs = self._specs.lookup(tenant_id)
        if not hit or specs is None:
            generation = self._specs.generation(tenant_id)
            specs = await budget_sql.budgets(tx, tenant_id)
            self._specs.put(tenant_id, specs, generation=generation)
        return specs

    # ------------------------------------------------------------ quotas

    async def set_quota(self, quota: Quota) -> Quota:
        """Replace the tenant's quota (the caller has scoped the context to quota.tenant_id)."""
        if problems := validate_quota(quota):
            raise InvalidArgument("invalid quota", reason="INVALID_QUOTA", violations=problems)
        now = self._clock()
        try:
            async with self._session() as s:
                await store.replace_quota(
                    s,
                    quota.tenant_id,
                    rpm=quota.requests_per_minute,
                    tpm=quota.tokens_per_minute,
                    concurrent=quota.concurrent_calls,
                    budgets=[(b.unit, b.limit, b.period, b.hard) for b in quota.budgets],
                    now_us=now,
                )
        finally:
            self._specs.invalidate(quota.tenant_id)  # after the commit: later reads see the new specs
        return await self.get_quota(quota.tenant_id)

    async def get_quota(self, tenant_id: str) -> Quota:
        """The tenant's quota (all zero and no budgets when none was set)."""
        async with self._session() as s:
            row, budgets = await store.get_quota(s)
        specs = tuple(BudgetSpec(b.unit, b.limit_amount, b.period, b.hard) for b in budgets)
        if row is None:
            return Quota(tenant_id=tenant_id, budgets=specs)
        return Quota(
            tenant_id, row.requests_per_minute, row.tokens_per_minute, row.concurrent_calls, specs, row.updated_us
        )

    async def status(self, tenant_id: str) -> tuple[Quota, list[BudgetState]]:
        """The quota with each budget's used, held and remaining in the current period."""
        await self.sweep()
        quota = await self.get_quota(tenant_id)
        now = self._clock()
        bounds = {spec.unit: periods.bounds(spec.period, now) for spec in quota.budgets}
        async with self._db.raw() as tx:
            counters = await budget_sql.counters(tx, tenant_id, *(bounds.get(u, (0, 0))[0] for u in UNITS))
        states = []
        for spec in quota.budgets:
            start, end = bounds[spec.unit]
            counter = counters.get(spec.unit, CounterState(0, 0))
            states.append(BudgetState(spec, start, end, counter.used, counter.held))
        return quota, states

    # ------------------------------------------------------------ reservations

    async def reserve(
        self,
        tenant_id: str,
        *,
        model: str,
        prompt_tokens: int,
        max_output_tokens: int,
        ttl_seconds: int = 0,
        idempotency_key: str = "",
    ) -> Reservation:
        """Hold the worst case of a call, or raise ResourceExhausted when a hard budget cannot hold it."""
        problems = {}
        if not model:
            problems["model"] = "required"
        problems.update(count_problems("", prompt_tokens=prompt_tokens, max_output_tokens=max_output_tokens))
        if prompt_tokens + max_output_tokens <= 0 and not problems:
            problems["max_output_tokens"] = "a call must hold at least one token"
        if len(idempotency_key) > 200:
            problems["idempotency_key"] = "at most 200 characters"
        if problems:
            raise InvalidArgument("invalid reservation", reason="INVALID_RESERVATION", violations=problems)
        ttl = _ttl(ttl_seconds, DEFAULT_RESERVATION_TTL_S, "ttl_seconds")
        price = await self._prices.current(model)
        amounts = Amounts(
            prompt_tokens + max_output_tokens, price.worst_case_micros(prompt_tokens, max_output_tokens) if price else 0
        )
        for attempt in range(3):
            try:
                return await self._reserve_once(tenant_id, model, amounts, price, ttl, idempotency_key)
            except _OverBudget as over:
                if attempt == 0 and await self.sweep():
                    continue  # expired holds were returned: the budget may fit now
                raise await self._exhausted(tenant_id, model, over) from None
            except budget_sql.DUPLICATE_KEY:
                continue  # a concurrent retry with the same key won: read its reservation
        raise FailedPrecondition("reservation could not be made", reason="RESERVATION_CONFLICT")

    async def _reserve_once(
        self, tenant_id: str, model: str, amounts: Amounts, price: Price | None, ttl: int, key: str
    ) -> Reservation:
        if self._one_trip:
            return await self._reserve_in_one_trip(tenant_id, model, amounts, price, ttl, key)
        return await self._reserve_in_transaction(tenant_id, model, amounts, price, ttl, key)

    async def _reserve_in_transaction(
        self, tenant_id: str, model: str, amounts: Amounts, price: Price | None, ttl: int, key: str
    ) -> Reservation:
        now = self._clock()
        async with self._write() as tx:
            if key and (found := await budget_sql.hold_by_key(tx, tenant_id, key)) is not None:
                hold_id, existing = found
                return Reservation(
                    hold_id,
                    Amounts(existing.tokens_held, existing.micros_held),
                    existing.expires_us,
                    existing.over_budget,
                )
            specs = await self._budget_specs(tx, tenant_id)
            if MICRO_USD in specs and price is None:
                raise FailedPrecondition(
                    f"model {model!r} has no price, so a money budget cannot hold it", reason="MODEL_NOT_PRICED"
                )
            hold = _new_reservation(model, key, price, now, ttl)
            over_budget = await self._place(
                tx, tenant_id, hold, specs, _unit_holds(specs, _period_starts(specs, now), amounts), _OverBudget
            )
        return Reservation(hold.hold_id, amounts, hold.expires_us, over_budget)

    async def _reserve_in_one_trip(
        self, tenant_id: str, model: str, amounts: Amounts, price: Price | None, ttl: int, key: str
    ) -> Reservation:
        """Postgres: _reserve_once's transaction as one statement, outside BEGIN/COMMIT (one round trip)."""
        hit, specs = self._specs.lookup(tenant_id)
        if not hit or specs is None:
            async with self._db.raw() as tx:
                specs = await self._budget_specs(tx, tenant_id)
        if MICRO_USD in specs and price is None:  # refused unless the key names an existing reservation
            return await self._reserve_in_transaction(tenant_id, model, amounts, price, ttl, key)
        now = self._clock()
        hold = _new_reservation(model, key, price, now, ttl)
        units = _unit_holds(specs, _period_starts(specs, now), amounts)
        tok_soft, mic_soft = (s.limit if (s := specs.get(u)) is not None and not s.hard else None for u in UNITS)
        item = (tenant_id, hold, units, (tok_soft, mic_soft))
        if key:  # a keyed one goes alone (its key is looked up first)
            done = await self._reserve_one(item)
        else:  # those sharing a tenant, its counters and its limits may share a round trip
            tok, mic = units
            group = (tenant_id, require_tenant().tier, tok.period_us, tok.hard_limit, mic.period_us, mic.hard_limit)
            done = await self._reserving.submit((*group, tok_soft, mic_soft), item)
        if isinstance(done, str):
            raise _OverBudget(specs[done], next(u.amount for u in units if u.unit == done))
        if done.existing_id is not None:
            return Reservation(
                done.existing_id, Amounts(done.tokens_held, done.micros_held), done.expires_us, done.over_budget
            )
        return Reservation(hold.hold_id, amounts, hold.expires_us, done.over_budget)

    async def _reserve_one(self, item: _ReserveItem) -> budget_sql.Reserved | str:
        tenant_id, hold, units, soft = item
        return await budget_sql.reserve_in_one_trip(self._db, tenant_id, hold, units, soft)

    async def _reserve_many(self, items: Sequence[_ReserveItem]) -> list[budget_sql.Reserved | str]:
        return list(await budget_sql.reserve_many(self._db, items[0][0], [item[1:] for item in items]))

    @staticmethod
    async def _place(
        tx: RawTransaction,
        tenant_id: str,
        hold: NewHold,
        specs: Specs,
        units: tuple[UnitHold, UnitHold],
        refused: Callable[[BudgetSpec, int], Exception],
    ) -> bool:
        """Place a hold within the hard limits; True when it passed a soft limit (the hold is flagged).

        Raises refused(spec, amount) (rolling the transaction back) when a hard limit cannot hold it.
        """
        placed = await budget_sql.place_hold(tx, tenant_id, hold, units)
        if placed.refused is not None:
            raise refused(specs[placed.refused], next(u.amount for u in units if u.unit == placed.refused))
        over = any(
            not spec.hard and (state := placed.states.get(unit)) is not None and state.used + state.held > spec.limit
            for unit, spec in specs.items()
        )
        if over:
            await budget_sql.flag_over_budget(tx, tenant_id, hold.hold_id)
        return over

    async def _exhausted(self, tenant_id: str, model: str, over: _OverBudget) -> ResourceExhausted:
        now = self._clock()
        start, end = periods.bounds(over.spec.period, now)
        async with self._db.raw() as tx:
            counter, soonest = await budget_sql.refusal_facts(tx, tenant_id, over.spec.unit, start)
        remaining = max(0, over.spec.limit - counter.used - counter.held)
        # Held budget comes back when holds settle or expire; otherwise only the next period helps.
        wait_us = (soonest - now) if soonest is not None and soonest > now and counter.held else end - now
        self._on_reject(tenant_id, model, f"budget_{over.spec.unit}")
        return ResourceExhausted(
            f"{over.spec.unit} budget exhausted: needs {over.needed}, {remaining} of {over.spec.limit} remain "
            f"this {over.spec.period}",
            reason="BUDGET_EXHAUSTED",
            metadata={"unit": over.spec.unit, "limit": str(over.spec.limit), "remaining": str(remaining)},
            violations=[
                (
                    f"budget:{over.spec.unit}",
                    f"needs {over.needed}; used {counter.used}, held {counter.held}, limit {over.spec.limit}",
                )
            ],
            retry_after=max(wait_us, 0) / periods.US_PER_SECOND,
        )

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
            raise InvalidArgument(
                f"{what} id is required", reason="INVALID_ARGUMENT", violations={f"{what}_id": "required"}
            )
        _check_counts(spent, field)
        tenant_id = require_tenant().tenant_id
        if self._one_trip:
            # The common case in one round trip: claim the open hold, price its spend, move its counters.
            item = (tenant_id, hold_id, kind, new_state, spent, self._clock())
            done = await self._settling.submit((tenant_id, require_tenant().tier, kind), item)
            if done is None:
                async with self._db.raw() as tx:
                    return await self._why_not_settled(tx, tenant_id, hold_id, kind, spent, new_state, what, field)
        else:
            async with self._write() as tx:
                # The common case in one statement: claim the open hold, price its spend, move its counters.
                done = await budget_sql.settle(tx, tenant_id, hold_id, kind, new_state, spent, self._clock())
                if done is None:
                    return await self._why_not_settled(tx, tenant_id, hold_id, kind, spent, new_state, what, field)
        charged = Amounts(done.charged_tokens, done.charged_micros)
        return Settlement(charged, Amounts(done.tokens_held - charged.tokens, done.micros_held - charged.micro_usd))

    async def _settle_one(self, item: _SettleItem) -> budget_sql.Settled | None:
        return await budget_sql.settle_in_one_trip(self._db, *item)

    async def _settle_many(self, items: Sequence[_SettleItem]) -> list[budget_sql.Settled | None]:
        """Settle a group in one round trip; a hold named again in the group (a retry) is settled after it, alone."""
        tenant_id, _, kind, _, _, _ = items[0]
        first: dict[str, _SettleItem] = {}
        for item in items:
            first.setdefault(item[1], item)
        settles = [(hold_id, state, spent, now) for _, hold_id, _, state, spent, now in first.values()]
        settled = await budget_sql.settle_many(self._db, tenant_id, kind, settles)
        return [settled.get(item[1]) if first[item[1]] is item else await self._settle_one(item) for item in items]

    async def _why_not_settled(
        self,
        tx: RawTransaction,
        tenant_id: str,
        hold_id: str,
        kind: str,
        spent: Tokens,
        new_state: str,
        what: str,
        field: str,
    ) -> Settlement:
        """A hold the settling statement did not take: missing, already settled, or spent too much."""
        hold = await budget_sql.get_hold(tx, tenant_id, hold_id, kind)
        if hold is None:
            raise NotFound(f"{what} not found", reason=_NOT_FOUND[kind])
        if hold.state != OPEN:
            return self._settled_again(hold, spent, new_state, what)
        raise _exceeds(hold, field)

    @staticmethod
    def _settled_again(hold: budget_sql.Hold, spent: Tokens, new_state: str, what: str) -> Settlement:
        """A repeated settle with the same outcome returns the first result; anything else is refused."""
        if hold.state == new_state and hold.spent == spent:
            charged = Amounts(hold.charged_tokens, hold.charged_micros)
            return Settlement(charged, Amounts(hold.tokens_held - charged.tokens, hold.micros_held - charged.micro_usd))
        raise FailedPrecondition(
            f"{what} is already {hold.state}", reason=_SETTLED.get((what, hold.state), Reason.FAILED_PRECONDITION)
        )

    async def sweep(self) -> int:
        """Expire the tenant's overdue holds: charge what leases reported, return the rest. Returns how many."""
        tenant_id = require_tenant().tenant_id
        async with self._write() as tx:
            return await budget_sql.expire(tx, tenant_id, self._clock())

    # ------------------------------------------------------------ leases

    async def lease(
        self, tenant_id: str, *, model: str, tokens: int, min_tokens: int = 0, ttl_seconds: int = 0, holder: str = ""
    ) -> LeaseInfo:
        """Grant up to `tokens` (at least min_tokens) for local spending, or raise ResourceExhausted.

        holder names the process that will spend and renew it (recorded, grants nothing).
        """
        problems = {}
        if not model:
            problems["model"] = "required"
        if tokens <= 0:
            problems["tokens"] = "must be positive"
        elif tokens > MAX_TOKENS:
            problems["tokens"] = f"at most {MAX_TOKENS:,}"
        if min_tokens < 0 or min_tokens > max(tokens, 0):
            problems["min_tokens"] = "between 0 and tokens"
        if len(holder) > MAX_HOLDER:
            problems["holder"] = f"at most {MAX_HOLDER} characters"
        elif not set(holder) <= _HOLDER_CHARS:
            problems["holder"] = "printable ASCII only"
        if problems:
            raise InvalidArgument("invalid lease", reason="INVALID_LEASE", violations=problems)
        ttl = _ttl(ttl_seconds, DEFAULT_LEASE_TTL_S, "ttl_seconds")
        price = await self._prices.current(model)
        for attempt in range(8):
            try:
                return await self._lease_once(tenant_id, model, tokens, min_tokens or tokens, price, ttl, holder)
            except _Raced:
                continue
            except _OverBudget as over:
                if attempt == 0 and await self.sweep():
                    continue
                raise await self._exhausted(tenant_id, model, over) from None
        raise FailedPrecondition("budget is too contended to lease right now", reason="LEASE_CONTENDED")

    async def _lease_once(
        self, tenant_id: str, model: str, wanted: int, least: int, price: Price | None, ttl: int, holder: str
    ) -> LeaseInfo:
        now = self._clock()
        rate = price.worst_rate() if price else 0
        async with self._write() as tx:
            specs = await self._budget_specs(tx, tenant_id)
            if MICRO_USD in specs and price is None:
                raise FailedPrecondition(
                    f"model {model!r} has no price, so a money budget cannot lease it", reason="MODEL_NOT_PRICED"
                )
            starts = _period_starts(specs, now)
            grant = wanted
            hard = [unit for unit in UNITS if unit in specs and specs[unit].hard]
            # Read without locking: the placing statement re-checks the limits, and a counter that
            # moved in between makes it refuse (_Raced), so the grant is recomputed.
            counters = await budget_sql.counters(tx, tenant_id, starts[TOKENS], starts[MICRO_USD]) if hard else {}
            for unit in hard:
                spec, counter = specs[unit], counters.get(unit, CounterState(0, 0))
                left = max(0, spec.limit - counter.used - counter.held)
                fits = left if unit == TOKENS else (left * TOKENS_PER_PRICE_UNIT // rate if rate else wanted)
                if fits < least:
                    raise _OverBudget(spec, least if unit == TOKENS else -(-least * rate // TOKENS_PER_PRICE_UNIT))
                grant = min(grant, fits)
            amounts = Amounts(grant, -(-grant * rate // TOKENS_PER_PRICE_UNIT))
            hold = NewHold(
                hold_id="lease_" + secrets.token_urlsafe(16),
                kind=LEASE,
                model=model,
                idempotency_key=None,
                priced_at_us=price.effective_us if price else 0,
                rates=_rates(price),
                created_us=now,
                expires_us=now + ttl * periods.US_PER_SECOND,
                holder=holder,
            )
            await self._place(
                tx, tenant_id, hold, specs, _unit_holds(specs, starts, amounts), lambda spec, amount: _Raced()
            )
        return LeaseInfo(hold.hold_id, model, amounts, Tokens(), hold.expires_us, holder)

    async def renew_lease(
        self, lease_id: str, spent: Tokens, ttl_seconds: int = 0, *, in_flight_tokens: int = 0
    ) -> LeaseInfo:
        """Record a lease's running spend and its holder's tokens in flight, and extend it (the heartbeat)."""
        if not lease_id:
            raise InvalidArgument(
                "lease id is required", reason="INVALID_ARGUMENT", violations={"lease_id": "required"}
            )
        _check_counts(spent, "spent")
        if not 0 <= in_flight_tokens <= MAX_TOKENS:
            raise InvalidArgument(
                "invalid in_flight_tokens",
                reason="INVALID_USAGE",
                violations={"in_flight_tokens": f"between 0 and {MAX_TOKENS:,}"},
            )
        ttl = _ttl(ttl_seconds, DEFAULT_LEASE_TTL_S, "ttl_seconds")
        now = self._clock()
        expires = now + ttl * periods.US_PER_SECOND
        tenant_id = require_tenant().tenant_id
        async with self._write() as tx:
            renewed = await budget_sql.renew(tx, tenant_id, lease_id, spent, in_flight_tokens, now, expires)
            if renewed is None:
                raise await self._why_not_renewed(tx, tenant_id, lease_id, spent, now)
        return LeaseInfo(
            lease_id,
            renewed.model,
            Amounts(renewed.tokens_held, renewed.micros_held),
            spent,
            expires,
            renewed.holder,
            in_flight_tokens,
        )

    @staticmethod
    async def _why_not_renewed(
        tx: RawTransaction, tenant_id: str, lease_id: str, spent: Tokens, now: int
    ) -> BulkheadError:
        """Why the renewing statement did not take a lease: missing, settled, expired, or a bad spend."""
        hold = await budget_sql.get_hold(tx, tenant_id, lease_id, LEASE)
        if hold is None:
            return NotFound("lease not found", reason="LEASE_NOT_FOUND")
        if hold.state != OPEN or hold.expires_us < now:
            state = hold.state if hold.state != OPEN else EXPIRED
            return FailedPrecondition(
                f"lease is {state}", reason=_SETTLED.get((LEASE, state), Reason.FAILED_PRECONDITION)
            )
        if any(now_ < then for now_, then in zip(spent.parts(), hold.spent.parts(), strict=True)):
            return InvalidArgument(
                "spent is a running total and cannot go down",
                reason="SPEND_DECREASED",
                violations={"spent": "less than already reported"},
            )
        if spent.total > hold.tokens_held or hold.cost_micros(spent) > hold.micros_held:
            return _exceeds(hold, "spent")
        return FailedPrecondition("lease was changed concurrently", reason="CONCURRENT_SETTLEMENT")

    async def release_lease(self, lease_id: str, spent: Tokens) -> Settlement:
        """Charge a lease's final spend and return the rest."""
        return await self._settle(lease_id, LEASE, spent, RELEASED)


def _check_counts(spent: Tokens, field: str) -> None:
    """Refuse a reported spend that is negative or beyond MAX_TOKENS before any arithmetic on it."""
    problems = tokens_problems(spent, field)
    if problems:
        raise InvalidArgument(f"invalid token counts in {field}", reason="INVALID_USAGE", violations=problems)

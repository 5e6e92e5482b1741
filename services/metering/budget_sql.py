"""Raw SQL for budget counters and holds: the reservation and lease hot path (no gRPC here).

The ORM twins of these tables live in store.py. Every statement names `tenant_id` itself (SQLite
has no row-level security); on Postgres db.raw() also runs it under RLS as the runtime role.

Exactness: a hold moves its counters in one INSERT .. ON CONFLICT DO UPDATE .. WHERE, which
Postgres re-checks against the newest row version after waiting for the row's lock (and SQLite
serialises writers), so concurrent holds on any number of replicas never pass a hard limit.

Lock order, the same in every transaction that moves counters, so none can deadlock: the hold
row (settling, sweeping) before counter rows; the tokens counter before the micro_usd counter
(within a unit, older periods first). A multi-row INSERT locks in the order of its rows; a
data-modifying CTE that reads another's output runs after it.

On Postgres a hold or a settlement is one statement (data-modifying CTEs); SQLite has no
data-modifying CTEs, so it runs the same pieces as separate statements in the same transaction.
A reservation and a settlement on Postgres go further: one round trip each, outside BEGIN/COMMIT,
through migration 0008's functions (the same SQL, after setting app.tenant_id for their own
implicit transaction; see oneshot.py), and several of one tenant in one (reserve_many,
settle_many: group commit, budgets.py). The functions' SQL is a frozen copy of the statements
here: a change to either needs a new migration for the other.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from services.metering import oneshot
from services.metering.pricing import TOKENS_PER_PRICE_UNIT, Price, Tokens
from services.metering.quotas import MICRO_USD, TOKENS, BudgetSpec
from shared.db.raw import RawTransaction

DUPLICATE_KEY = (asyncpg.UniqueViolationError, sqlite3.IntegrityError)
"""What a hold insert raises when a concurrent call with the same idempotency key won."""

_POSTGRES = "postgresql"


def refused_whole(exc: Exception) -> bool:
    """Whether a one-trip call's error was Postgres refusing it, its one transaction rolled back (nothing done).

    oneshot.call raises a lost connection, whose outcome is unknown, as UNAVAILABLE instead."""
    return isinstance(exc, asyncpg.PostgresError)


@dataclass(frozen=True, slots=True)
class UnitHold:
    """What a new hold adds to one unit's counter."""

    unit: str
    """TOKENS or MICRO_USD."""
    period_us: int
    """The counter's period start."""
    amount: int
    """Added to held (a zero amount leaves the counter alone)."""
    hard_limit: int | None
    """When set, used + held may not pass it."""


@dataclass(frozen=True, slots=True)
class NewHold:
    """A reservation or lease to insert."""

    hold_id: str
    """Its id."""
    kind: str
    """"reservation" or "lease"."""
    model: str
    """The model it is for."""
    idempotency_key: str | None
    """A reservation's retry key (None for leases)."""
    priced_at_us: int
    """The effective time of the price it was made with (0 when unpriced)."""
    rates: tuple[int, int, int, int]
    """That price's rates (input, output, cache write, cache read), micro-USD per million tokens."""
    created_us: int
    """When it was made."""
    expires_us: int
    """When it expires unless settled (or renewed)."""
    holder: str = ""
    """A lease's holder (the process spending it); empty for reservations."""


@dataclass(frozen=True, slots=True)
class CounterState:
    """A counter after a change."""

    used: int
    """Charged this period."""
    held: int
    """Held by open holds."""


@dataclass(frozen=True, slots=True)
class Placed:
    """The outcome of placing a hold: the counters it moved, or the first unit that refused it."""

    states: dict[str, CounterState]
    """Counter states after the hold, by unit (units with a zero amount are absent)."""
    refused: str | None
    """The first unit whose hard limit could not take the hold (the caller must roll back)."""


@dataclass(frozen=True, slots=True)
class Hold:
    """A stored hold, as the settling and explaining paths need it."""

    model: str
    """The model it is for."""
    state: str
    """open, committed, released or expired."""
    tokens_held: int
    """Tokens it holds."""
    micros_held: int
    """Micro-USD it holds."""
    tokens_period_us: int
    """The period of the tokens counter it holds in."""
    micros_period_us: int
    """The period of the micro_usd counter it holds in."""
    charged_tokens: int
    """Tokens charged (at settlement, or as a lease last reported)."""
    charged_micros: int
    """Micro-USD charged."""
    spent: Tokens
    """Spend recorded on it."""
    expires_us: int
    """When it expires unless settled."""
    over_budget: bool
    """It passed a soft budget."""
    rates: tuple[int, int, int, int]
    """The rates it was priced with (input, output, cache write, cache read), micro-USD per million tokens."""
    holder: str = ""
    """A lease's holder."""
    in_flight_tokens: int = 0
    """What a lease's holder last reported in flight."""

    def cost_micros(self, spent: Tokens) -> int:
        """Spend priced at the hold's rates, rounded up to whole micro-USD (as the settling SQL does)."""
        return Price(self.model, 0, *self.rates).cost_micros_ceil(spent)


# ---------------------------------------------------------------- budgets

_BUDGETS = "SELECT unit, limit_amount, period, hard FROM metering_budgets WHERE tenant_id = $1"


async def budgets(tx: RawTransaction, tenant_id: str) -> dict[str, BudgetSpec]:
    """The tenant's budgets by unit."""
    return {r[0]: BudgetSpec(r[0], int(r[1]), r[2], bool(r[3])) for r in await tx.fetch(_BUDGETS, tenant_id)}


# ---------------------------------------------------------------- placing holds

# $1 tenant; tokens: $2 period, $3 amount, $4 hard limit; micro_usd: $5 period, $6 amount, $7 hard limit.
# Rows go in unit lock order (UNION ALL keeps it); a zero amount is skipped; a new row is only
# inserted within its limit; an existing one is only bumped within it (no row back = refused).
_HOLD_COUNTERS = """
INSERT INTO metering_budget_counters AS c (tenant_id, unit, period_us, used, held)
SELECT $1, v.unit, v.period_us, 0, v.amount
FROM (SELECT 'tokens' AS unit, CAST($2 AS BIGINT) AS period_us, CAST($3 AS BIGINT) AS amount,
             CAST($4 AS BIGINT) AS lim
      UNION ALL
      SELECT 'micro_usd', CAST($5 AS BIGINT), CAST($6 AS BIGINT), CAST($7 AS BIGINT)) AS v
WHERE v.amount > 0 AND (v.lim IS NULL OR v.amount <= v.lim)
ON CONFLICT (tenant_id, unit, period_us) DO UPDATE SET held = c.held + excluded.held
WHERE c.used + c.held + excluded.held <= COALESCE(
    CASE excluded.unit WHEN 'tokens' THEN CAST($4 AS BIGINT) ELSE CAST($7 AS BIGINT) END,
    c.used + c.held + excluded.held)
RETURNING unit, used, held"""

_HOLD_COLUMNS = """tenant_id, hold_id, kind, model, idempotency_key, tokens_held, micros_held, tokens_period_us,
    micros_period_us, priced_at_us, rate_input, rate_output, rate_cache_write, rate_cache_read, state, over_budget,
    created_us, expires_us, settled_us, spent_input, spent_output, spent_cache_write, spent_cache_read,
    charged_tokens, charged_micros, holder, in_flight_tokens"""

# $8 hold id, $9 kind, $10 model, $11 key, $12 priced at, $13-$16 rates, $17 created, $18 expires, $19 holder.
_HOLD_VALUES = """$1, $8, $9, $10, $11, $3, $6, $2, $5, $12, $13, $14, $15, $16, 'open', FALSE, $17, $18,
    0, 0, 0, 0, 0, 0, 0, $19, 0"""

# Postgres: the counters and the hold in one statement; the hold goes in only when every counter
# asked for ($20 of them) took its amount, and fewer counter rows back means refused.
_PG_PLACE_HOLD = f"""
WITH c AS ({_HOLD_COUNTERS}),
h AS (INSERT INTO metering_holds ({_HOLD_COLUMNS})
      SELECT {_HOLD_VALUES} WHERE (SELECT count(*) FROM c) = $20
      RETURNING hold_id)
SELECT c.unit, c.used, c.held FROM c"""

_INSERT_HOLD = f"INSERT INTO metering_holds ({_HOLD_COLUMNS}) VALUES ({_HOLD_VALUES})"

_FLAG_OVER_BUDGET = "UPDATE metering_holds SET over_budget = TRUE WHERE tenant_id = $1 AND hold_id = $2"


async def place_hold(tx: RawTransaction, tenant_id: str, hold: NewHold, units: tuple[UnitHold, UnitHold]) -> Placed:
    """Add a hold's amounts to its counters within their hard limits and insert the hold.

    `units` is (tokens, micro_usd), in that order. When a unit refuses, nothing of the hold is
    inserted but an earlier counter may have moved: the caller must roll the transaction back.
    Raises one of DUPLICATE_KEY when the idempotency key is already taken.
    """
    tok, mic = units
    if (tok.unit, mic.unit) != (TOKENS, MICRO_USD):
        raise ValueError("counters are locked tokens first, then micro_usd")
    wanted = [u.unit for u in units if u.amount > 0]
    args = (
        tenant_id,
        tok.period_us,
        tok.amount,
        tok.hard_limit,
        mic.period_us,
        mic.amount,
        mic.hard_limit,
        *_hold_fields(hold),
    )
    if tx.dialect == _POSTGRES:
        rows = await tx.fetch(_PG_PLACE_HOLD, *args, len(wanted))
    else:
        rows = await tx.fetch(_HOLD_COUNTERS, *args[:7])  # SQLite wants exactly the parameters a statement names
    states = {r[0]: CounterState(int(r[1]), int(r[2])) for r in rows}
    refused = next((unit for unit in wanted if unit not in states), None)
    if refused is None and tx.dialect != _POSTGRES:
        await tx.execute(_INSERT_HOLD, *args)
    return Placed(states, refused)


OVER_BUDGET = "metering: over budget"
"""The message metering_reserve (migration 0008) refuses a hold with; its detail names the unit."""


@dataclass(frozen=True, slots=True)
class Reserved:
    """What metering_reserve did: placed the new hold, or found the key's existing one."""

    existing_id: str | None
    """The reservation that already had the idempotency key (None: the new hold was placed)."""
    tokens_held: int
    """Tokens it holds."""
    micros_held: int
    """Micro-USD it holds."""
    expires_us: int
    """When it expires."""
    over_budget: bool
    """It passed a soft budget."""


async def reserve_in_one_trip(
    db, tenant_id: str, hold: NewHold, units: tuple[UnitHold, UnitHold], soft: tuple[int | None, int | None]
) -> Reserved | str:
    """Postgres: a keyed reservation's existing hold, else place `hold` as place_hold does and flag it when a
    counter passed its soft limit (`soft`: tokens, micro_usd), all in one round trip and one transaction.

    Returns the refused unit (nothing changed) when a hard limit cannot hold it. Raises one of
    DUPLICATE_KEY when a concurrent reservation took the idempotency key first.
    """
    tok, mic = units
    if (tok.unit, mic.unit) != (TOKENS, MICRO_USD):
        raise ValueError("counters are locked tokens first, then micro_usd")
    try:
        rows = await oneshot.call(
            db,
            "metering_reserve",
            tenant_id,
            tok.period_us,
            tok.amount,
            tok.hard_limit,
            soft[0],
            mic.period_us,
            mic.amount,
            mic.hard_limit,
            soft[1],
            *_hold_fields(hold),
        )
    except asyncpg.RaiseError as exc:
        if exc.args[:1] == (OVER_BUDGET,) and exc.detail in (TOKENS, MICRO_USD):
            return exc.detail
        raise
    existing, tokens, micros, expires, over = rows[0]
    return Reserved(existing, int(tokens), int(micros), int(expires), bool(over))


async def reserve_many(
    db, tenant_id: str, holds: Sequence[tuple[NewHold, tuple[UnitHold, UnitHold], tuple[int | None, int | None]]]
) -> list[Reserved]:
    """Postgres: many key-less reservations of one tenant, with the same counters, limits and soft limits, placed in
    turn as reserve_in_one_trip places one, in one round trip and one transaction (metering_reserve_many).

    Raises when any is refused (nothing changed then: the caller places each alone).
    """
    (tok, mic), soft = holds[0][1], holds[0][2]
    if (tok.unit, mic.unit) != (TOKENS, MICRO_USD):
        raise ValueError("counters are locked tokens first, then micro_usd")
    shared = (tok.period_us, tok.hard_limit, mic.period_us, mic.hard_limit, soft)
    if any(
        h.idempotency_key is not None
        or h.kind != "reservation"
        or (t.period_us, t.hard_limit, m.period_us, m.hard_limit, s) != shared
        for h, (t, m), s in holds
    ):
        raise ValueError("a group of reservations shares its counters and limits, and has no keys")
    rows = await oneshot.call(
        db,
        "metering_reserve_many",
        tenant_id,
        tok.period_us,
        tok.hard_limit,
        soft[0],
        mic.period_us,
        mic.hard_limit,
        soft[1],
        [units[0].amount for _, units, _ in holds],
        [units[1].amount for _, units, _ in holds],
        [h.hold_id for h, _, _ in holds],
        [h.model for h, _, _ in holds],
        [h.priced_at_us for h, _, _ in holds],
        *([h.rates[k] for h, _, _ in holds] for k in range(4)),
        [h.created_us for h, _, _ in holds],
        [h.expires_us for h, _, _ in holds],
    )
    if len(rows) != len(holds):
        raise RuntimeError("metering_reserve_many answered for a different number of reservations")
    return [
        Reserved(None, units[0].amount, units[1].amount, h.expires_us, bool(row[0]))
        for (h, units, _), row in zip(holds, rows, strict=True)
    ]


async def flag_over_budget(tx: RawTransaction, tenant_id: str, hold_id: str) -> None:
    """Mark a hold as one that passed a soft budget (rare: only soft budgets can be passed)."""
    await tx.execute(_FLAG_OVER_BUDGET, tenant_id, hold_id)


# ---------------------------------------------------------------- reading counters and holds

_COUNTERS = """SELECT unit, used, held FROM metering_budget_counters
WHERE tenant_id = $1 AND ((unit = 'tokens' AND period_us = $2) OR (unit = 'micro_usd' AND period_us = $3))"""

_REFUSAL = """SELECT c.used, c.held,
    (SELECT min(expires_us) FROM metering_holds WHERE tenant_id = $1 AND state = 'open')
FROM (SELECT 1 AS one) AS one
LEFT JOIN metering_budget_counters AS c ON c.tenant_id = $1 AND c.unit = $2 AND c.period_us = $3"""

_HOLD_FIELDS = """model, state, tokens_held, micros_held, tokens_period_us, micros_period_us, charged_tokens,
    charged_micros, spent_input, spent_output, spent_cache_write, spent_cache_read, expires_us, over_budget,
    rate_input, rate_output, rate_cache_write, rate_cache_read, holder, in_flight_tokens"""

_GET_HOLD = f"SELECT {_HOLD_FIELDS} FROM metering_holds WHERE tenant_id = $1 AND hold_id = $2 AND kind = $3"

_HOLD_BY_KEY = f"SELECT hold_id, {_HOLD_FIELDS} FROM metering_holds WHERE tenant_id = $1 AND idempotency_key = $2"


def _hold(row: Sequence) -> Hold:
    return Hold(
        model=row[0],
        state=row[1],
        tokens_held=int(row[2]),
        micros_held=int(row[3]),
        tokens_period_us=int(row[4]),
        micros_period_us=int(row[5]),
        charged_tokens=int(row[6]),
        charged_micros=int(row[7]),
        spent=Tokens(int(row[8]), int(row[9]), int(row[10]), int(row[11])),
        expires_us=int(row[12]),
        over_budget=bool(row[13]),
        rates=(int(row[14]), int(row[15]), int(row[16]), int(row[17])),
        holder=row[18],
        in_flight_tokens=int(row[19]),
    )


async def counters(
    tx: RawTransaction, tenant_id: str, tokens_period_us: int, micros_period_us: int
) -> dict[str, CounterState]:
    """The tenant's tokens and micro_usd counters in the given periods (absent when never held in)."""
    rows = await tx.fetch(_COUNTERS, tenant_id, tokens_period_us, micros_period_us)
    return {r[0]: CounterState(int(r[1]), int(r[2])) for r in rows}


async def refusal_facts(
    tx: RawTransaction, tenant_id: str, unit: str, period_us: int
) -> tuple[CounterState, int | None]:
    """What a refusal reports: the counter, and when the tenant's earliest open hold expires (if any)."""
    used, held, soonest = await tx.fetchrow(_REFUSAL, tenant_id, unit, period_us) or (0, 0, None)  # aggregates: 1 row
    return CounterState(int(used or 0), int(held or 0)), (int(soonest) if soonest is not None else None)


async def get_hold(tx: RawTransaction, tenant_id: str, hold_id: str, kind: str) -> Hold | None:
    """A hold of the tenant by id and kind (another tenant's id is simply not found)."""
    row = await tx.fetchrow(_GET_HOLD, tenant_id, hold_id, kind)
    return _hold(row) if row is not None else None


async def hold_by_key(tx: RawTransaction, tenant_id: str, key: str) -> tuple[str, Hold] | None:
    """A hold of the tenant by its idempotency key: (hold id, hold)."""
    row = await tx.fetchrow(_HOLD_BY_KEY, tenant_id, key)
    return (row[0], _hold(tuple(row)[1:])) if row is not None else None


# ---------------------------------------------------------------- settling


def _cost(first: int) -> str:
    """SQL for a spend (parameters $first..$first+3) priced at the hold's own rates, rounded up to whole micro-USD."""
    i, o, cw, cr = (f"${n}" for n in range(first, first + 4))
    return (
        f"(rate_input * {i} + rate_output * {o} + rate_cache_write * {cw} + rate_cache_read * {cr} + "
        f"{TOKENS_PER_PRICE_UNIT - 1}) / {TOKENS_PER_PRICE_UNIT}"
    )


# $1 tenant, $2 hold id, $3 kind, $4 new state, $5 now, $6-$9 spend, $10 its token total.
# Only an open hold of this tenant and kind that can cover the spend is taken.
_SETTLE_HOLD = f"""
UPDATE metering_holds SET state = $4, settled_us = $5, spent_input = $6, spent_output = $7,
    spent_cache_write = $8, spent_cache_read = $9, charged_tokens = $10, charged_micros = {_cost(6)}
WHERE tenant_id = $1 AND hold_id = $2 AND kind = $3 AND state = 'open' AND tokens_held >= $10
    AND micros_held >= {_cost(6)}
RETURNING tokens_held, micros_held, tokens_period_us, micros_period_us, charged_tokens, charged_micros"""

# Postgres: the hold, then its tokens counter, then its micro_usd counter, in one statement. `mic`
# waits for `tok` through its one-time filter, which keeps the counters' lock order.
_PG_SETTLE = f"""
WITH h AS ({_SETTLE_HOLD}),
tok AS (UPDATE metering_budget_counters AS c
        SET held = c.held - h.tokens_held, used = c.used + h.charged_tokens
        FROM h WHERE c.tenant_id = $1 AND c.unit = 'tokens' AND c.period_us = h.tokens_period_us
        RETURNING c.unit),
mic AS (UPDATE metering_budget_counters AS c
        SET held = c.held - h.micros_held, used = c.used + h.charged_micros
        FROM h WHERE c.tenant_id = $1 AND c.unit = 'micro_usd' AND c.period_us = h.micros_period_us
            AND (h.micros_held <> 0 OR h.charged_micros <> 0) AND (SELECT count(*) FROM tok) >= 0
        RETURNING c.unit)
SELECT h.*, (SELECT count(*) FROM mic) FROM h"""

_MOVE_COUNTER = """UPDATE metering_budget_counters SET held = held - $4, used = used + $5
WHERE tenant_id = $1 AND unit = $2 AND period_us = $3"""


@dataclass(frozen=True, slots=True)
class Settled:
    """A settled hold: what it held and what it charged."""

    tokens_held: int
    """Tokens it held."""
    micros_held: int
    """Micro-USD it held."""
    charged_tokens: int
    """Tokens moved into used."""
    charged_micros: int
    """Micro-USD moved into used."""


async def settle(
    tx: RawTransaction, tenant_id: str, hold_id: str, kind: str, new_state: str, spent: Tokens, now_us: int
) -> Settled | None:
    """Settle an open hold: charge `spent` at its rates, release the rest from held into used.

    None when the hold is not this tenant's open `kind`, or `spent` exceeds what it holds (in
    tokens or money): nothing changed, and get_hold says which.
    """
    args = (tenant_id, hold_id, kind, new_state, now_us, *spent.parts(), spent.total)
    if tx.dialect == _POSTGRES:
        row = await tx.fetchrow(_PG_SETTLE, *args)
    else:
        row = await tx.fetchrow(_SETTLE_HOLD, *args)
        if row is not None:
            await move_counters(
                tx,
                tenant_id,
                [(TOKENS, int(row[2]), int(row[0]), int(row[4])), (MICRO_USD, int(row[3]), int(row[1]), int(row[5]))],
            )
    if row is None:
        return None
    return Settled(int(row[0]), int(row[1]), int(row[4]), int(row[5]))


async def settle_in_one_trip(
    db, tenant_id: str, hold_id: str, kind: str, new_state: str, spent: Tokens, now_us: int
) -> Settled | None:
    """Postgres: settle() in one round trip and one transaction (metering_settle, migration 0008)."""
    rows = await oneshot.call(
        db, "metering_settle", tenant_id, hold_id, kind, new_state, now_us, *spent.parts(), spent.total
    )
    if not rows:
        return None
    tokens_held, micros_held, charged_tokens, charged_micros = rows[0]
    return Settled(int(tokens_held), int(micros_held), int(charged_tokens), int(charged_micros))


async def settle_many(
    db, tenant_id: str, kind: str, settles: Sequence[tuple[str, str, Tokens, int]]
) -> dict[str, Settled]:
    """Postgres: settle_in_one_trip for many (hold id, new state, spent, now) of one tenant and kind, distinct hold
    ids, in one round trip and one transaction (metering_settle_many). The holds taken, by id; the others changed
    nothing (get_hold says why)."""
    if len({hold_id for hold_id, _, _, _ in settles}) != len(settles):
        raise ValueError("a hold is settled at most once per call")
    rows = await oneshot.call(
        db,
        "metering_settle_many",
        tenant_id,
        kind,
        [hold_id for hold_id, _, _, _ in settles],
        [state for _, state, _, _ in settles],
        [now for _, _, _, now in settles],
        *([spent.parts()[k] for _, _, spent, _ in settles] for k in range(4)),
        [spent.total for _, _, spent, _ in settles],
    )
    return {row[0]: Settled(int(row[1]), int(row[2]), int(row[3]), int(row[4])) for row in rows}


async def move_counters(tx: RawTransaction, tenant_id: str, moves: Sequence[tuple[str, int, int, int]]) -> None:
    """Apply (unit, period, release from held, charge to used) moves, in the order given."""
    for unit, period_us, release, charge in moves:
        if release or charge:
            await tx.execute(_MOVE_COUNTER, tenant_id, unit, period_us, release, charge)


# ---------------------------------------------------------------- leases and expiry

# $1 tenant, $2 lease id, $3 now, $4 new expiry, $5-$8 spend (a running total: never lower than
# reported before), $9 its token total, $10 tokens in flight (replaces the last report). Only an
# open, unexpired lease is renewed.
_RENEW = f"""
UPDATE metering_holds SET expires_us = $4, spent_input = $5, spent_output = $6, spent_cache_write = $7,
    spent_cache_read = $8, charged_tokens = $9, charged_micros = {_cost(5)}, in_flight_tokens = $10
WHERE tenant_id = $1 AND hold_id = $2 AND kind = 'lease' AND state = 'open' AND expires_us >= $3
    AND spent_input <= $5 AND spent_output <= $6 AND spent_cache_write <= $7 AND spent_cache_read <= $8
    AND tokens_held >= $9 AND micros_held >= {_cost(5)}
RETURNING model, tokens_held, micros_held, holder"""


@dataclass(frozen=True, slots=True)
class Renewed:
    """A renewed lease."""

    model: str
    """The model it is for."""
    tokens_held: int
    """Tokens it holds."""
    micros_held: int
    """Micro-USD it holds."""
    holder: str
    """Who holds it."""


async def renew(
    tx: RawTransaction,
    tenant_id: str,
    lease_id: str,
    spent: Tokens,
    in_flight_tokens: int,
    now_us: int,
    expires_us: int,
) -> Renewed | None:
    """Record a lease's running spend (charged at its rates) and its holder's tokens in flight, and extend it.

    None when it is not this tenant's open, unexpired lease, or the spend went down or past the
    grant: nothing changed, and get_hold says which.
    """
    row = await tx.fetchrow(
        _RENEW, tenant_id, lease_id, now_us, expires_us, *spent.parts(), spent.total, in_flight_tokens
    )
    return Renewed(row[0], int(row[1]), int(row[2]), row[3]) if row is not None else None


def _least(a: str, b: str) -> str:
    """SQL for the smaller of two expressions (SQLite has no LEAST)."""
    return f"CASE WHEN {a} < {b} THEN {a} ELSE {b} END"


_WORST_RATE = (
    "CASE WHEN rate_input >= rate_output AND rate_input >= rate_cache_write AND rate_input >= rate_cache_read"
    " THEN rate_input WHEN rate_output >= rate_cache_write AND rate_output >= rate_cache_read THEN rate_output"
    " WHEN rate_cache_write >= rate_cache_read THEN rate_cache_write ELSE rate_cache_read END"
)
"""A hold's highest rate: what its calls in flight are priced at (their kinds are unknown), as a lease's grant is."""

# An expiring hold charges what it last reported plus what its holder last reported in flight
# (a dead proxy's calls in flight may have been billed: the ledger meters them at their
# reservation), never more than it holds. Reservations have nothing in flight.
_EXPIRE = f"""
UPDATE metering_holds SET state = 'expired', settled_us = $2,
    charged_tokens = {_least("charged_tokens + in_flight_tokens", "tokens_held")},
    charged_micros = {
    _least(
        f"charged_micros + (in_flight_tokens * {_WORST_RATE} + {TOKENS_PER_PRICE_UNIT - 1}) / {TOKENS_PER_PRICE_UNIT}",
        "micros_held",
    )
}
WHERE tenant_id = $1 AND state = 'open' AND expires_us < $2
RETURNING tokens_held, micros_held, tokens_period_us, micros_period_us, charged_tokens, charged_micros"""


async def expire(tx: RawTransaction, tenant_id: str, now_us: int) -> int:
    """Expire the tenant's overdue holds: charge what each last reported (a lease: with its calls in flight,
    up to its grant), return the rest. Returns how many.

    The guarded UPDATE expires each hold once even when sweepers race; their counter moves are
    summed per counter and applied in lock order.
    """
    rows = await tx.fetch(_EXPIRE, tenant_id, now_us)
    moves: dict[tuple[int, int], list[int]] = {}
    for tokens_held, micros_held, tokens_period, micros_period, charged_tokens, charged_micros in rows:
        for key, release, charge in (
            ((0, int(tokens_period)), tokens_held, charged_tokens),
            ((1, int(micros_period)), micros_held, charged_micros),
        ):
            acc = moves.setdefault(key, [0, 0])
            acc[0] += int(release)
            acc[1] += int(charge)
    await move_counters(
        tx,
        tenant_id,
        [
            ((TOKENS, MICRO_USD)[unit], period, release, charge)
            for (unit, period), (release, charge) in sorted(moves.items())
        ],
    )
    return len(rows)


def _hold_fields(hold: NewHold) -> tuple:
    """A new hold's own columns, in the order every placing statement and function takes them."""
    return (
        hold.hold_id,
        hold.kind,
        hold.model,
        hold.idempotency_key,
        hold.priced_at_us,
        *hold.rates,
        hold.created_us,
        hold.expires_us,
        hold.holder,
    )

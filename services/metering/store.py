"""The metering tables and every query on them (no gRPC here).

Budget counters move only through single conditional UPDATEs, so concurrent reservers on any
number of replicas can never push `used + held` past a hard limit: Postgres re-checks the WHERE
clause against the row's newest version after waiting for its lock, and SQLite serialises writers.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Sequence

from sqlalchemy import (
    BigInteger,
    Index,
    Integer,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    and_,
    case,
    cast,
    func,
    literal,
    not_,
    or_,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from services.metering import periods
from services.metering.pricing import Price, Tokens
from services.metering.usage import (
    AGENT,
    DAY,
    HOUR,
    PRINCIPAL,
    PartialSum,
    UsageBatch,
    UsageQuery,
    UsageRecord,
)
from shared.db import Base, TenantOwned
from shared.db.raw import RawTransaction

_NO_UPDATE_SYNC = {"synchronize_session": False}


class MeteringBase(Base):
    """The metering service's tables."""


class UsageEventRow(MeteringBase, TenantOwned):
    """One metered call; (tenant, idempotency key) is unique, so a retry is never counted twice."""

    __tablename__ = "metering_usage_events"
    __table_args__ = (
        PrimaryKeyConstraint("tenant_id", "idempotency_key"),
        Index("ix_metering_usage_events_tenant_time", "tenant_id", "occurred_us"),
    )

    idempotency_key: Mapped[str] = mapped_column(String(200))
    principal_id: Mapped[str] = mapped_column(String(200), default="")
    agent_id: Mapped[str] = mapped_column(String(200), default="")
    run_id: Mapped[str] = mapped_column(String(200), default="")
    trace_id: Mapped[str] = mapped_column(String(200), default="")
    model: Mapped[str] = mapped_column(String(200))
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cache_write_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cache_read_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    latency_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    outcome: Mapped[int] = mapped_column(SmallInteger, default=1)
    occurred_us: Mapped[int] = mapped_column(BigInteger)
    # Hour and day numbers since the epoch, stored so grouping is the same SQL on every dialect.
    hour: Mapped[int] = mapped_column(Integer)
    day: Mapped[int] = mapped_column(Integer)
    recorded_us: Mapped[int] = mapped_column(BigInteger)


class UsageHourRow(MeteringBase, TenantOwned):
    """The tenant's events summed per hour, model, agent, principal and outcome (see rollup.py).

    Kept in the transaction that inserts the events, from the newly inserted ones only, so it always
    equals a GROUP BY over metering_usage_events. No cost: reports price tokens at query time, with
    the price versions in force then, exactly as they price events.
    """

    __tablename__ = "metering_usage_hours"
    __table_args__ = (PrimaryKeyConstraint("tenant_id", "hour", "model", "agent_id", "principal_id", "outcome"),)

    hour: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(200))
    agent_id: Mapped[str] = mapped_column(String(200))
    principal_id: Mapped[str] = mapped_column(String(200))
    outcome: Mapped[int] = mapped_column(SmallInteger)
    event_count: Mapped[int] = mapped_column(BigInteger, default=0)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cache_write_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cache_read_tokens: Mapped[int] = mapped_column(BigInteger, default=0)


class UsageRetentionRow(MeteringBase, TenantOwned):
    """Where the tenant's per-event usage detail ends (services/metering/retention.py): events before
    hour pruned_before_hour were pruned by its retention, except those of hours in which a price
    version starts (kept so those hours stay priced exactly). Reports read those hours from the roll-up."""

    __tablename__ = "metering_usage_retention"
    __table_args__ = (PrimaryKeyConstraint("tenant_id"),)

    pruned_before_hour: Mapped[int] = mapped_column(Integer)
    pruned_events: Mapped[int] = mapped_column(BigInteger, default=0)
    """Events pruned so far (for operators; the roll-up still counts them)."""


class PriceRow(MeteringBase):
    """A price version (platform-wide, not tenant data)."""

    __tablename__ = "metering_prices"
    __table_args__ = (PrimaryKeyConstraint("model", "effective_us"),)

    model: Mapped[str] = mapped_column(String(200))
    effective_us: Mapped[int] = mapped_column(BigInteger)
    input_micros: Mapped[int] = mapped_column(BigInteger)
    output_micros: Mapped[int] = mapped_column(BigInteger)
    cache_write_micros: Mapped[int] = mapped_column(BigInteger)
    cache_read_micros: Mapped[int] = mapped_column(BigInteger)


class QuotaRow(MeteringBase, TenantOwned):
    """A tenant's rate limits (0 = unlimited)."""

    __tablename__ = "metering_quotas"
    __table_args__ = (PrimaryKeyConstraint("tenant_id"),)

    requests_per_minute: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_per_minute: Mapped[int] = mapped_column(BigInteger, default=0)
    concurrent_calls: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_us: Mapped[int] = mapped_column(BigInteger)


class BudgetRow(MeteringBase, TenantOwned):
    """One budget of a tenant: at most one per unit."""

    __tablename__ = "metering_budgets"
    __table_args__ = (PrimaryKeyConstraint("tenant_id", "unit"),)

    unit: Mapped[str] = mapped_column(String(16))
    limit_amount: Mapped[int] = mapped_column(BigInteger)
    period: Mapped[str] = mapped_column(String(8))
    hard: Mapped[bool] = mapped_column(default=True)


class CounterRow(MeteringBase, TenantOwned):
    """What is used and held of one unit in one period (kept whether or not a budget is set)."""

    __tablename__ = "metering_budget_counters"
    __table_args__ = (PrimaryKeyConstraint("tenant_id", "unit", "period_us"),)

    unit: Mapped[str] = mapped_column(String(16))
    period_us: Mapped[int] = mapped_column(BigInteger)
    used: Mapped[int] = mapped_column(BigInteger, default=0)
    held: Mapped[int] = mapped_column(BigInteger, default=0)


class HoldRow(MeteringBase, TenantOwned):
    """A reservation or a lease: budget held until it is settled, released or expires."""

    __tablename__ = "metering_holds"
    __table_args__ = (
        PrimaryKeyConstraint("hold_id"),
        # One index leads with tenant_id, and it names the hold too: on a table without statistics the
        # planner cannot tell a tenant-only prefix from a hold probe, and a prefix walks every hold of the
        # tenant (migration 0009). The others lead with what their look-ups fix first.
        Index("uq_metering_holds_tenant_hold", "tenant_id", "hold_id", unique=True),
        Index("ix_metering_holds_open", "state", "tenant_id", "expires_us"),
        Index("uq_metering_holds_key", "idempotency_key", "tenant_id", unique=True),
    )

    hold_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(200))
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    tokens_held: Mapped[int] = mapped_column(BigInteger)
    micros_held: Mapped[int] = mapped_column(BigInteger)
    tokens_period_us: Mapped[int] = mapped_column(BigInteger)
    micros_period_us: Mapped[int] = mapped_column(BigInteger)
    priced_at_us: Mapped[int] = mapped_column(BigInteger)
    # The price's rates (micro-USD per million tokens) copied at hold time, so a settlement is
    # priced in the same UPDATE that claims it.
    rate_input: Mapped[int] = mapped_column(BigInteger, default=0)
    rate_output: Mapped[int] = mapped_column(BigInteger, default=0)
    rate_cache_write: Mapped[int] = mapped_column(BigInteger, default=0)
    rate_cache_read: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[str] = mapped_column(String(16))
    over_budget: Mapped[bool] = mapped_column(default=False)
    created_us: Mapped[int] = mapped_column(BigInteger)
    expires_us: Mapped[int] = mapped_column(BigInteger)
    settled_us: Mapped[int] = mapped_column(BigInteger, default=0)
    spent_input: Mapped[int] = mapped_column(BigInteger, default=0)
    spent_output: Mapped[int] = mapped_column(BigInteger, default=0)
    spent_cache_write: Mapped[int] = mapped_column(BigInteger, default=0)
    spent_cache_read: Mapped[int] = mapped_column(BigInteger, default=0)
    charged_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    charged_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    # A lease's holder (the process spending it) and the tokens its calls in flight held at its
    # last renewal: an expired lease charges them on top of its spend, up to the grant.
    holder: Mapped[str] = mapped_column(String(200), default="")
    in_flight_tokens: Mapped[int] = mapped_column(BigInteger, default=0)

    @property
    def spent(self) -> Tokens:
        """The spend recorded on this hold."""
        return Tokens(self.spent_input, self.spent_output, self.spent_cache_write, self.spent_cache_read)


class TenantSeenRow(MeteringBase):
    """Tenants with metering data: operators' all-tenant reports walk this list (RLS shows one tenant at a time)."""

    __tablename__ = "metering_tenants"
    __table_args__ = (PrimaryKeyConstraint("tenant_id"),)

    tenant_id: Mapped[str] = mapped_column(String(64))
    tier: Mapped[str] = mapped_column(String(16), default="pooled")
    first_seen_us: Mapped[int] = mapped_column(BigInteger)


class OperatorAuditRow(MeteringBase):
    """One operator action on tenant data (who, what, on which tenant, when)."""

    __tablename__ = "metering_operator_audit"

    audit_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at_us: Mapped[int] = mapped_column(BigInteger)
    operator_id: Mapped[str] = mapped_column(String(200))
    request_id: Mapped[str] = mapped_column(String(200))
    method: Mapped[str] = mapped_column(String(64))
    target_tenant: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(String(500), default="")


# ---------------------------------------------------------------- helpers


def _insert(session: AsyncSession, model: type):
    """A dialect insert that supports ON CONFLICT DO NOTHING."""
    if session.bind is None:  # Database.session() always binds one
        raise RuntimeError("an unbound session has no dialect to insert with")
    dialect = session.bind.dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(model)


# ---------------------------------------------------------------- usage

_USAGE_COLUMNS = """tenant_id, idempotency_key, principal_id, agent_id, run_id, trace_id, model, input_tokens,
    output_tokens, cache_write_tokens, cache_read_tokens, latency_ms, outcome, occurred_us, hour, day, recorded_us"""


# Postgres: one statement, the batch's columns in one JSON parameter ($3: thirteen arrays, in the order of
# `e` below). The driver checks every element of an array parameter in Python (~0.3 us each), so thirteen
# arrays of a thousand events cost ~3.5 ms of CPU per batch; the JSON text costs ~0.9 ms to build and the
# database less than that to read (parsed once: the MATERIALIZED CTE keeps the planner from copying the
# cast into all thirteen reads). The rows go in in the batch's order, as with arrays; the new keys come back
# as one array.
@functools.lru_cache(maxsize=4)
def _pg_json_insert(then: str = "") -> str:
    """The insert, with `then` (more CTEs reading the inserted rows as `new`) in the same statement."""
    return f"""
WITH batch AS MATERIALIZED (SELECT CAST(CAST($3 AS TEXT) AS JSONB) AS j),
new AS (
INSERT INTO metering_usage_events ({_USAGE_COLUMNS})
SELECT $1, k, p, a, r, t, m, i, o, cw, cr, l, oc, ts, ts / {periods.US_PER_HOUR}, ts / {periods.US_PER_DAY}, $2
FROM (SELECT e.k, e.p, e.a, e.r, e.t, e.m, CAST(e.i AS BIGINT) AS i, CAST(e.o AS BIGINT) AS o,
             CAST(e.cw AS BIGINT) AS cw, CAST(e.cr AS BIGINT) AS cr, CAST(e.l AS BIGINT) AS l,
             CAST(e.oc AS SMALLINT) AS oc, CAST(e.ts AS BIGINT) AS ts
      FROM batch,
           ROWS FROM ({", ".join(f"jsonb_array_elements_text(batch.j -> {n})" for n in range(13))})
           AS e(k, p, a, r, t, m, i, o, cw, cr, l, oc, ts)) AS v
ON CONFLICT DO NOTHING
RETURNING idempotency_key, hour, model, agent_id, principal_id, outcome, input_tokens, output_tokens,
    cache_write_tokens, cache_read_tokens){then}
SELECT array_agg(idempotency_key) FROM new"""


_SQLITE_ROWS_PER_INSERT = 500  # SQLite caps the parameters of one statement


@functools.lru_cache(maxsize=8)
def _sqlite_usage_insert(rows: int) -> str:
    """A multi-row insert of `rows` events (17 parameters each)."""
    width = 17
    values = ", ".join(
        "(" + ", ".join(f"${row * width + col + 1}" for col in range(width)) + ")" for row in range(rows)
    )
    return (
        f"INSERT INTO metering_usage_events ({_USAGE_COLUMNS}) VALUES {values} "
        "ON CONFLICT DO NOTHING RETURNING idempotency_key"
    )


async def insert_usage(
    tx: RawTransaction,
    tenant_id: str,
    records: Sequence[UsageRecord] | UsageBatch,
    now_us: int,
    *,
    default_principal: str = "",
    then: str = "",
) -> set[str]:
    """Insert the tenant's events, skipping keys already stored; returns the keys that were new.

    Events without a principal are stored as default_principal's (the caller's). then (Postgres only):
    more CTEs, `, name AS (...)`, run in the same statement on the inserted rows (`new`; $1 is the tenant).
    """
    batch = records if isinstance(records, UsageBatch) else UsageBatch.from_records(records)
    principals = [p or default_principal for p in batch.principals]
    columns = [  # one list per column, in the order both inserts below read them
        batch.keys,
        principals,
        batch.agents,
        batch.runs,
        batch.traces,
        batch.models,
        batch.inputs,
        batch.outputs,
        batch.cache_writes,
        batch.cache_reads,
        batch.latencies_ms,
        batch.outcomes,
        batch.occurred_us,
    ]
    if tx.dialect == "postgresql":
        new_keys = await tx.fetchval(
            _pg_json_insert(then), tenant_id, now_us, json.dumps(columns, separators=(",", ":"))
        )
        return set(new_keys or ())
    new: set[str] = set()
    rows_of = zip(*columns, strict=True)
    while chunk := list(itertools.islice(rows_of, _SQLITE_ROWS_PER_INSERT)):
        args = [
            value
            for key, principal, agent, run, trace, model, i, o, cw, cr, latency, outcome, at in chunk
            for value in (
                tenant_id,
                key,
                principal,
                agent,
                run,
                trace,
                model,
                i,
                o,
                cw,
                cr,
                latency,
                outcome,
                at,
                at // periods.US_PER_HOUR,
                at // periods.US_PER_DAY,
                now_us,
            )
        ]
        new.update(row[0] for row in await tx.fetch(_sqlite_usage_insert(len(chunk)), *args))
    return new


def _source(hourly: bool) -> dict:
    """The columns one usage sum reads: the events themselves, or their hourly roll-up."""
    if hourly:
        h = UsageHourRow
        # "at" is the hour's start: callers skip hours in which a price version starts.
        at = cast(h.hour, BigInteger) * literal(periods.US_PER_HOUR, BigInteger)
        return {
            "model": h.model,
            "agent": h.agent_id,
            "principal": h.principal_id,
            "day": h.hour // 24,
            "hour": h.hour,
            "at": at,
            "count": func.sum(h.event_count),
            "errors": func.sum(case((h.outcome != 1, h.event_count), else_=0)),
            "tokens": [
                func.sum(h.input_tokens),
                func.sum(h.output_tokens),
                func.sum(h.cache_write_tokens),
                func.sum(h.cache_read_tokens),
            ],
        }
    e = UsageEventRow
    return {
        "model": e.model,
        "agent": e.agent_id,
        "principal": e.principal_id,
        "day": e.day,
        "hour": e.hour,
        "at": e.occurred_us,
        "count": func.count(),
        "errors": func.sum(case((e.outcome != 1, 1), else_=0)),
        "tokens": [
            func.sum(e.input_tokens),
            func.sum(e.output_tokens),
            func.sum(e.cache_write_tokens),
            func.sum(e.cache_read_tokens),
        ],
    }


async def sum_usage(
    session: AsyncSession,
    query: UsageQuery,
    prices: dict[str, list[Price]],
    *,
    hourly: bool = False,
    only: frozenset[tuple[str, int]] = frozenset(),
    skip: frozenset[tuple[str, int]] = frozenset(),
) -> list[PartialSum]:
    """Sums of the tenant's events grouped by the query's dimensions, model and price version.

    hourly reads the roll-up instead (the query's bounds must then be whole hours, and no price
    version may start inside an hour it reads: pass those (model, hour) pairs as skip). only and skip
    keep or drop the (model, hour) pairs given.
    """
    c = _source(hourly)
    whens = [
        (and_(c["model"] == model, c["at"] >= p.effective_us), p.effective_us)
        for model, versions in prices.items()
        for p in reversed(versions)
    ]
    version = case(*whens, else_=-1) if whens else literal(-1)
    keys = [c["model"], version]
    if AGENT in query.group_by:
        keys.append(c["agent"])
    if PRINCIPAL in query.group_by:
        keys.append(c["principal"])
    if DAY in query.group_by:
        keys.append(c["day"])
    elif HOUR in query.group_by:
        keys.append(c["hour"])
    stmt = select(*keys, c["count"], c["errors"], *c["tokens"])
    if hourly:
        h = periods.US_PER_HOUR
        stmt = stmt.where(UsageHourRow.hour >= query.start_us // h, UsageHourRow.hour < query.end_us // h)
    else:
        stmt = stmt.where(UsageEventRow.occurred_us >= query.start_us, UsageEventRow.occurred_us < query.end_us)
    pairs = [and_(c["model"] == m, c["hour"] == hour) for m, hour in sorted(only | skip)]
    if only:
        stmt = stmt.where(or_(*pairs))
    elif skip:
        stmt = stmt.where(not_(or_(*pairs)))
    if query.model:
        stmt = stmt.where(c["model"] == query.model)
    if query.agent_id:
        stmt = stmt.where(c["agent"] == query.agent_id)
    if query.principal_id:
        stmt = stmt.where(c["principal"] == query.principal_id)
    # Group by position: a bound CASE repeated in GROUP BY would not match the SELECT on Postgres.
    stmt = stmt.group_by(*(text(str(i + 1)) for i in range(len(keys))))
    out = []
    for row in (await session.execute(stmt)).all():
        model, eff, *rest = row
        n = len(keys) - 2
        dims, (count, errors, i, o, cw, cr) = rest[:n], rest[n:]
        it = iter(dims)
        out.append(
            PartialSum(
                model=model,
                price_effective_us=None if eff == -1 else int(eff),
                agent_id=next(it) if AGENT in query.group_by else "",
                principal_id=next(it) if PRINCIPAL in query.group_by else "",
                bucket=int(next(it)) if (DAY in query.group_by or HOUR in query.group_by) else None,
                event_count=int(count),
                error_count=int(errors or 0),
                tokens=Tokens(int(i or 0), int(o or 0), int(cw or 0), int(cr or 0)),
            )
        )
    return out


async def complete_pairs(session: AsyncSession, pairs: frozenset[tuple[str, int]]) -> frozenset[tuple[str, int]]:
    """The (model, hour) pairs whose events are all still stored (as many as the roll-up counts)."""
    if not pairs:
        return frozenset()
    e, h = UsageEventRow, UsageHourRow
    wanted_e = or_(*(and_(e.model == m, e.hour == hour) for m, hour in sorted(pairs)))
    wanted_h = or_(*(and_(h.model == m, h.hour == hour) for m, hour in sorted(pairs)))
    events = {
        (m, int(hr)): int(n)
        for m, hr, n in (
            await session.execute(select(e.model, e.hour, func.count()).where(wanted_e).group_by(e.model, e.hour))
        ).all()
    }
    rolled = {
        (m, int(hr)): int(n or 0)
        for m, hr, n in (
            await session.execute(
                select(h.model, h.hour, func.sum(h.event_count)).where(wanted_h).group_by(h.model, h.hour)
            )
        ).all()
    }
    return frozenset(p for p in pairs if events.get(p, 0) == rolled.get(p, 0))


async def pruned_before_hour(session: AsyncSession) -> int:
    """Where the current tenant's per-event detail starts (0: nothing pruned)."""
    return int((await session.execute(select(UsageRetentionRow.pruned_before_hour))).scalar() or 0)


# ---------------------------------------------------------------- prices, tenants, audit


async def upsert_price(session: AsyncSession, price: Price) -> None:
    """Store a price version, replacing one with the same model and effective time."""
    values = {
        "model": price.model,
        "effective_us": price.effective_us,
        "input_micros": price.input,
        "output_micros": price.output,
        "cache_write_micros": price.cache_write,
        "cache_read_micros": price.cache_read,
    }
    stmt = _insert(session, PriceRow).values(values)
    stmt = stmt.on_conflict_do_update(
        index_elements=["model", "effective_us"],
        set_={k: v for k, v in values.items() if k not in ("model", "effective_us")},
    )
    await session.execute(stmt)


async def all_prices(session: AsyncSession) -> list[Price]:
    """Every price version."""
    rows = (await session.execute(select(PriceRow))).scalars().all()
    return [
        Price(r.model, r.effective_us, r.input_micros, r.output_micros, r.cache_write_micros, r.cache_read_micros)
        for r in rows
    ]


async def note_tenant(session: AsyncSession, tenant_id: str, tier: str, now_us: int) -> None:
    """Remember that a tenant has metering data, and its tier (where its rows live)."""
    await session.execute(
        _insert(session, TenantSeenRow)
        .values(tenant_id=tenant_id, tier=tier, first_seen_us=now_us)
        .on_conflict_do_nothing()
    )


async def known_tenants(session: AsyncSession) -> dict[str, str]:
    """Every tenant with metering data and its tier, sorted by tenant."""
    rows = await session.execute(select(TenantSeenRow.tenant_id, TenantSeenRow.tier).order_by(TenantSeenRow.tenant_id))
    return {tid: tier for tid, tier in rows.all()}


async def add_audit(
    session: AsyncSession,
    *,
    operator_id: str,
    request_id: str,
    method: str,
    target_tenant: str,
    detail: str,
    now_us: int,
) -> None:
    """Record an operator action."""
    session.add(
        OperatorAuditRow(
            at_us=now_us,
            operator_id=operator_id,
            request_id=request_id,
            method=method,
            target_tenant=target_tenant,
            detail=detail[:500],
        )
    )


async def audit_entries(session: AsyncSession) -> list[OperatorAuditRow]:
    """Every audit row, oldest first."""
    return list((await session.execute(select(OperatorAuditRow).order_by(OperatorAuditRow.audit_id))).scalars())


# ---------------------------------------------------------------- quotas


async def get_quota(session: AsyncSession) -> tuple[QuotaRow | None, list[BudgetRow]]:
    """The tenant's quota row and budgets."""
    quota = (await session.execute(select(QuotaRow))).scalar_one_or_none()
    budgets = list((await session.execute(select(BudgetRow).order_by(BudgetRow.unit))).scalars())
    return quota, budgets


async def replace_quota(
    session: AsyncSession,
    tenant_id: str,
    *,
    rpm: int,
    tpm: int,
    concurrent: int,
    budgets: Sequence[tuple[str, int, str, bool]],
    now_us: int,
) -> None:
    """Replace the tenant's quota and budgets ((unit, limit, period, hard) tuples)."""
    existing, old = await get_quota(session)
    for row in old:
        await session.delete(row)
    if existing is None:
        session.add(
            QuotaRow(
                tenant_id=tenant_id,
                requests_per_minute=rpm,
                tokens_per_minute=tpm,
                concurrent_calls=concurrent,
                updated_us=now_us,
            )
        )
    else:
        existing.requests_per_minute, existing.tokens_per_minute = rpm, tpm
        existing.concurrent_calls, existing.updated_us = concurrent, now_us
    await session.flush()
    for unit, limit, period, hard in budgets:
        session.add(BudgetRow(tenant_id=tenant_id, unit=unit, limit_amount=limit, period=period, hard=hard))

"""Usage events, their validation, and sums of them priced at each event's own time."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from services.metering import periods
from services.metering.pricing import MAX_TOKENS, PriceBook, Tokens, tokens_problems

MAX_BATCH = 5000
_Key = TypeVar("_Key", bound=Hashable)
MAX_LATENCY_MS = 86_400_000
MAX_TEXT = 200
MAX_OCCURRED_US = 253_402_300_799_999_999
"""The last microsecond of year 9999, protobuf's latest Timestamp: later ones overflow the ledger's 64-bit column."""

# Outcomes, as stored (the proto enum's numbers).
OUTCOME_SUCCESS = 1

MODEL, AGENT, PRINCIPAL, DAY, HOUR = "model", "agent", "principal", "day", "hour"
GROUPINGS = (MODEL, AGENT, PRINCIPAL, DAY, HOUR)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One metered model call of the caller's tenant."""

    idempotency_key: str
    """Unique per tenant; a repeat is accepted and not counted again."""
    model: str
    """The model, with its pinned version."""
    occurred_us: int
    """When the call was made (epoch microseconds)."""
    tokens: Tokens = Tokens()
    """Tokens used."""
    principal_id: str = ""
    """Who made the call."""
    agent_id: str = ""
    """The agent that made it, if any."""
    run_id: str = ""
    """The run it belongs to, if any."""
    trace_id: str = ""
    """Its trace, if any."""
    latency_ms: int = 0
    """Wall time of the call."""
    outcome: int = OUTCOME_SUCCESS
    """How it ended (proto Outcome number)."""


def validate_batch(records: Sequence[UsageRecord]) -> dict[str, str]:
    """Field violations of a batch ({"events[3].model": "required"}); empty when it is valid."""
    problems: dict[str, str] = {}
    if not records:
        problems["events"] = "at least one event is required"
    if len(records) > MAX_BATCH:
        problems["events"] = f"at most {MAX_BATCH} events per batch"
    for i, rec in enumerate(records):
        where = f"events[{i}]"
        if not rec.idempotency_key:
            problems[f"{where}.idempotency_key"] = "required"
        elif len(rec.idempotency_key) > MAX_TEXT:
            problems[f"{where}.idempotency_key"] = f"at most {MAX_TEXT} characters"
        if not rec.model:
            problems[f"{where}.model"] = "required"
        elif len(rec.model) > MAX_TEXT:
            problems[f"{where}.model"] = f"at most {MAX_TEXT} characters"
        for name in ("principal_id", "agent_id", "run_id", "trace_id"):
            if len(getattr(rec, name)) > MAX_TEXT:
                problems[f"{where}.{name}"] = f"at most {MAX_TEXT} characters"
        if rec.occurred_us <= 0:
            problems[f"{where}.occur_time"] = "required"
        elif rec.occurred_us > MAX_OCCURRED_US:
            problems[f"{where}.occur_time"] = "must be a valid timestamp (before the year 10000)"
        problems.update(tokens_problems(rec.tokens, f"{where}.tokens"))
        if not 0 <= rec.latency_ms <= MAX_LATENCY_MS:
            problems[f"{where}.latency_ms"] = f"between 0 and {MAX_LATENCY_MS:,} (a day)"
    return problems


@dataclass(frozen=True, slots=True)
class UsageBatch:
    """A batch of events as columns (one list per field, index i is event i): the ingest hot path's form.

    Validating, inserting and summing a thousand events column by column costs a fraction of the
    same work over a thousand UsageRecords (building them alone was a third of RecordUsage's CPU).
    """

    keys: list[str]
    """Idempotency keys."""
    models: list[str]
    """Models."""
    occurred_us: list[int]
    """When each call was made (epoch microseconds)."""
    inputs: list[int]
    """Input tokens."""
    outputs: list[int]
    """Output tokens."""
    cache_writes: list[int]
    """Cache write tokens."""
    cache_reads: list[int]
    """Cache read tokens."""
    principals: list[str]
    """Principals ("" for the caller's)."""
    agents: list[str]
    """Agents."""
    runs: list[str]
    """Runs."""
    traces: list[str]
    """Traces."""
    latencies_ms: list[int]
    """Wall times."""
    outcomes: list[int]
    """Outcomes (proto Outcome numbers)."""

    @classmethod
    def from_rows(cls, rows: Iterable[tuple]) -> UsageBatch:
        """From tuples in field order."""
        columns = list(zip(*rows, strict=True))
        return cls(*(list(c) for c in columns)) if columns else cls(*([] for _ in range(13)))

    @classmethod
    def from_records(cls, records: Iterable[UsageRecord]) -> UsageBatch:
        """The records as columns."""
        return cls.from_rows(
            (
                r.idempotency_key,
                r.model,
                r.occurred_us,
                r.tokens.input,
                r.tokens.output,
                r.tokens.cache_write,
                r.tokens.cache_read,
                r.principal_id,
                r.agent_id,
                r.run_id,
                r.trace_id,
                r.latency_ms,
                r.outcome,
            )
            for r in records
        )

    def __len__(self) -> int:
        return len(self.keys)

    def sums_by(self, keys: Iterable[_Key]) -> dict[_Key, list[int]]:
        """[events, input, output, cache write, cache read] per key; keys holds one key per event, in order."""
        sums: dict[_Key, list[int]] = {}
        for key, i, o, cw, cr in zip(keys, self.inputs, self.outputs, self.cache_writes, self.cache_reads, strict=True):
            acc = sums.get(key)
            if acc is None:
                sums[key] = [1, i, o, cw, cr]
            else:
                acc[0] += 1
                acc[1] += i
                acc[2] += o
                acc[3] += cw
                acc[4] += cr
        return sums

    def take(self, indices: Sequence[int]) -> UsageBatch:
        """The events at these indices, in that order."""
        return UsageBatch(*([column[i] for i in indices] for column in self._columns()))

    def only(self, keys: set[str]) -> UsageBatch:
        """The events whose idempotency key is in keys (the batch itself when that is all of them)."""
        if len(keys) == len(self) and all(key in keys for key in self.keys):
            return self
        return self.take([i for i, key in enumerate(self.keys) if key in keys])

    def records(self) -> list[UsageRecord]:
        """The events as UsageRecords."""
        return [
            UsageRecord(k, m, ts, Tokens(i, o, cw, cr), p, a, r, t, lat, oc)
            for k, m, ts, i, o, cw, cr, p, a, r, t, lat, oc in zip(*self._columns(), strict=True)
        ]

    def _columns(self) -> tuple[list, ...]:
        return (
            self.keys,
            self.models,
            self.occurred_us,
            self.inputs,
            self.outputs,
            self.cache_writes,
            self.cache_reads,
            self.principals,
            self.agents,
            self.runs,
            self.traces,
            self.latencies_ms,
            self.outcomes,
        )


def _longest(column: list[str]) -> int:
    return max(map(len, column), default=0)


def batch_problems(batch: UsageBatch) -> dict[str, str]:
    """validate_batch for a UsageBatch: the same violations, found column by column when there are none."""
    counts = (batch.inputs, batch.outputs, batch.cache_writes, batch.cache_reads)
    fine = (
        0 < len(batch) <= MAX_BATCH
        and all(batch.keys)
        and all(batch.models)
        and max(map(_longest, (batch.keys, batch.models, batch.principals, batch.agents, batch.runs, batch.traces)))
        <= MAX_TEXT
        and min(batch.occurred_us) > 0
        and max(batch.occurred_us) <= MAX_OCCURRED_US
        and all(min(c) >= 0 and max(c) <= MAX_TOKENS for c in counts)
        and min(batch.latencies_ms) >= 0
        and max(batch.latencies_ms) <= MAX_LATENCY_MS
    )
    return {} if fine else validate_batch(batch.records())  # something is wrong: name it exactly as ever


def first_of_each_key(batch: UsageBatch) -> UsageBatch:
    """dedupe for a UsageBatch: repeated idempotency keys dropped (the first one wins)."""
    if len(set(batch.keys)) == len(batch):
        return batch
    seen: set[str] = set()
    first = []
    for i, key in enumerate(batch.keys):
        if key not in seen:
            seen.add(key)
            first.append(i)
    return batch.take(first)


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """Which events to sum, and how to group them."""

    start_us: int
    """Range start, inclusive."""
    end_us: int
    """Range end, exclusive."""
    group_by: tuple[str, ...] = ()
    """Dimensions from GROUPINGS, in the order given."""
    model: str = ""
    """Only this model, when set."""
    agent_id: str = ""
    """Only this agent, when set."""
    principal_id: str = ""
    """Only this principal, when set."""


def validate_query(query: UsageQuery, prefix: str = "filter") -> dict[str, str]:
    """Field violations of a query; empty when it is valid."""
    problems: dict[str, str] = {}
    at = f"{prefix}." if prefix else ""
    if query.start_us <= 0:
        problems[f"{at}start_time"] = "required"
    if query.end_us <= 0:
        problems[f"{at}end_time"] = "required"
    elif query.end_us <= query.start_us:
        problems[f"{at}end_time"] = "must be after start_time"
    if len(set(query.group_by)) != len(query.group_by):
        problems["group_by"] = "a dimension is named twice"
    if any(g not in GROUPINGS for g in query.group_by):
        problems["group_by"] = "unknown dimension"
    if DAY in query.group_by and HOUR in query.group_by:
        problems["group_by"] = "group by day or by hour, not both"
    return problems


@dataclass(frozen=True, slots=True)
class PartialSum:
    """A sum the store computed: one group, one model, one price version."""

    model: str
    """The model."""
    price_effective_us: int | None
    """Which price version priced these events (None: no price was in force)."""
    agent_id: str = ""
    """The agent, when grouped by agent."""
    principal_id: str = ""
    """The principal, when grouped by principal."""
    bucket: int | None = None
    """Day or hour number since the epoch, when grouped by one."""
    event_count: int = 0
    """Events summed."""
    error_count: int = 0
    """Events that did not succeed."""
    tokens: Tokens = Tokens()
    """Tokens summed."""


@dataclass(slots=True)
class UsageTotal:
    """One row of a usage report."""

    tenant_id: str
    """The tenant."""
    model: str = ""
    """The model, when grouped by model."""
    agent_id: str = ""
    """The agent, when grouped by agent."""
    principal_id: str = ""
    """The principal, when grouped by principal."""
    period_start_us: int | None = None
    """Start of the day or hour, when grouped by one."""
    event_count: int = 0
    """Events."""
    error_count: int = 0
    """Events that did not succeed."""
    tokens: Tokens = field(default_factory=Tokens)
    """Tokens summed."""
    cost_scaled: int = 0
    """Cost in micro-USD times a million (see pricing.scaled_to_usd)."""
    unpriced_tokens: int = 0
    """Tokens of events no price was in force for."""

    def sort_key(self) -> tuple:
        """Rows are ordered by their group keys."""
        return (self.tenant_id, self.period_start_us or 0, self.model, self.agent_id, self.principal_id)


def total(
    partials: Iterable[PartialSum], *, tenant_id: str, group_by: Sequence[str], book: PriceBook
) -> list[UsageTotal]:
    """Fold the store's partial sums into report rows, each event priced at its own time."""
    rows: dict[tuple, UsageTotal] = {}
    for part in partials:
        period_start: int | None = None
        if part.bucket is not None and DAY in group_by:  # the store sets bucket when grouping by time
            period_start = part.bucket * periods.US_PER_DAY
        elif part.bucket is not None and HOUR in group_by:
            period_start = part.bucket * periods.US_PER_HOUR
        row_key = UsageTotal(
            tenant_id=tenant_id,
            model=part.model if MODEL in group_by else "",
            agent_id=part.agent_id if AGENT in group_by else "",
            principal_id=part.principal_id if PRINCIPAL in group_by else "",
            period_start_us=period_start,
        )
        row = rows.setdefault(row_key.sort_key(), row_key)
        row.event_count += part.event_count
        row.error_count += part.error_count
        row.tokens = row.tokens + part.tokens
        price = None
        if part.price_effective_us is not None:
            price = book.price_at(part.model, part.price_effective_us)
        if price is None:
            row.unpriced_tokens += part.tokens.total
        else:
            row.cost_scaled += price.cost_scaled(part.tokens)
    return sorted(rows.values(), key=UsageTotal.sort_key)


def month_of(day_start_us: int) -> int:
    """Start of the calendar month holding a day."""
    return periods.bounds(periods.MONTH, day_start_us)[0]


def fold_into_months(rows: Iterable[UsageTotal]) -> list[UsageTotal]:
    """Day rows (grouped by model and day) merged into month rows."""
    months: dict[tuple, UsageTotal] = {}
    for row in rows:
        month = replace(
            row,
            period_start_us=month_of(row.period_start_us or 0),
            event_count=0,
            error_count=0,
            tokens=Tokens(),
            cost_scaled=0,
            unpriced_tokens=0,
        )
        acc = months.setdefault(month.sort_key(), month)
        acc.event_count += row.event_count
        acc.error_count += row.error_count
        acc.tokens = acc.tokens + row.tokens
        acc.cost_scaled += row.cost_scaled
        acc.unpriced_tokens += row.unpriced_tokens
    return sorted(months.values(), key=UsageTotal.sort_key)

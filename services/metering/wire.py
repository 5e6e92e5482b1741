"""Conversions between metering protos and domain values (no handlers here)."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from bulkhead.metering.v1 import metering_pb2 as pb
from services.metering import periods
from services.metering.pricing import Price, Tokens, format_usd, scaled_to_usd
from services.metering.quotas import MICRO_USD, TOKENS, Amounts, BudgetSpec, BudgetState, LeaseInfo, Quota
from services.metering.usage import (
    AGENT,
    DAY,
    HOUR,
    MODEL,
    PRINCIPAL,
    UsageBatch,
    UsageQuery,
    UsageTotal,
)
from shared import paging
from shared.errors import InvalidArgument

GROUPINGS = {
    pb.USAGE_GROUPING_MODEL: MODEL,
    pb.USAGE_GROUPING_AGENT: AGENT,
    pb.USAGE_GROUPING_PRINCIPAL: PRINCIPAL,
    pb.USAGE_GROUPING_DAY: DAY,
    pb.USAGE_GROUPING_HOUR: HOUR,
}
UNITS = {pb.BUDGET_UNIT_TOKENS: TOKENS, pb.BUDGET_UNIT_MICRO_USD: MICRO_USD}
UNIT_ENUMS = {v: k for k, v in UNITS.items()}
PERIODS = {
    pb.BUDGET_PERIOD_UNSPECIFIED: periods.MONTH,
    pb.BUDGET_PERIOD_DAY: periods.DAY,
    pb.BUDGET_PERIOD_MONTH: periods.MONTH,
}
PERIOD_ENUMS = {periods.DAY: pb.BUDGET_PERIOD_DAY, periods.MONTH: pb.BUDGET_PERIOD_MONTH}
DEFAULT_PAGE, MAX_PAGE = 100, 1000


def micros(ts: timestamp_pb2.Timestamp, present: bool, field: str = "time") -> int:
    """A Timestamp as epoch microseconds (0 when absent); InvalidArgument naming field when out of range."""
    if not present:
        return 0
    try:
        return ts.ToMicroseconds()
    except ValueError:  # seconds outside years 1-9999 or nanos outside 0-999999999 (found by fuzzing)
        raise InvalidArgument(
            f"{field} is not a valid timestamp",
            reason="INVALID_TIMESTAMP",
            violations={field: "years 0001 to 9999, nanos 0 to 999999999"},
        ) from None


def timestamp(us: int) -> timestamp_pb2.Timestamp:
    """Epoch microseconds as a Timestamp."""
    ts = timestamp_pb2.Timestamp()
    ts.FromMicroseconds(us)
    return ts


def tokens(msg: pb.TokenCounts) -> Tokens:
    """TokenCounts as Tokens."""
    return Tokens(msg.input_tokens, msg.output_tokens, msg.cache_write_tokens, msg.cache_read_tokens)


def token_counts(value: Tokens) -> pb.TokenCounts:
    """Tokens as TokenCounts."""
    return pb.TokenCounts(
        input_tokens=value.input,
        output_tokens=value.output,
        cache_write_tokens=value.cache_write,
        cache_read_tokens=value.cache_read,
    )


def usage_batch(events) -> UsageBatch:
    """UsageEvents as a UsageBatch (the ingest hot path: each field read once, no object per event)."""
    success = pb.OUTCOME_SUCCESS
    return UsageBatch.from_rows(
        (
            e.idempotency_key,
            e.model,
            (at := e.occur_time).seconds * 1_000_000 + at.nanos // 1000,
            (counts := e.tokens).input_tokens,
            counts.output_tokens,
            counts.cache_write_tokens,
            counts.cache_read_tokens,
            e.principal_id,
            e.agent_id,
            e.run_id,
            e.trace_id,
            e.latency_ms,
            e.outcome or success,
        )
        for e in events
    )


def usage_query(flt: pb.UsageFilter, group_by) -> UsageQuery:
    """A filter and grouping as a UsageQuery (unknown dimensions fail validation)."""
    return UsageQuery(
        start_us=micros(flt.start_time, flt.HasField("start_time"), "filter.start_time"),
        end_us=micros(flt.end_time, flt.HasField("end_time"), "filter.end_time"),
        group_by=tuple(GROUPINGS.get(g, f"unknown:{g}") for g in group_by),
        model=flt.model,
        agent_id=flt.agent_id,
        principal_id=flt.principal_id,
    )


def usage_row(row: UsageTotal) -> pb.UsageRow:
    """A report row as a UsageRow."""
    msg = pb.UsageRow(
        tenant_id=row.tenant_id,
        model=row.model,
        agent_id=row.agent_id,
        principal_id=row.principal_id,
        event_count=row.event_count,
        error_count=row.error_count,
        tokens=token_counts(row.tokens),
        cost_usd=format_usd(scaled_to_usd(row.cost_scaled)),
        unpriced_tokens=row.unpriced_tokens,
    )
    if row.period_start_us is not None:
        msg.period_start.CopyFrom(timestamp(row.period_start_us))
    return msg


def page(items: list, page_size: int, page_token: str, *, filters: object) -> tuple[list, str]:
    """One page of a listing computed whole, and the token of the next ("" at the end)."""
    size = paging.page_size(page_size, default=DEFAULT_PAGE, maximum=MAX_PAGE)
    chunk = paging.offset_page(items, size, page_token, filters=filters)
    return chunk.items, chunk.next_page_token


def price(msg: pb.Price) -> Price:
    """A Price message as a Price."""
    return Price(
        msg.model,
        micros(msg.effective_time, msg.HasField("effective_time"), "price.effective_time"),
        msg.input_micros_per_mtok,
        msg.output_micros_per_mtok,
        msg.cache_write_micros_per_mtok,
        msg.cache_read_micros_per_mtok,
    )


def price_msg(value: Price) -> pb.Price:
    """A Price as a Price message."""
    return pb.Price(
        model=value.model,
        effective_time=timestamp(value.effective_us),
        input_micros_per_mtok=value.input,
        output_micros_per_mtok=value.output,
        cache_write_micros_per_mtok=value.cache_write,
        cache_read_micros_per_mtok=value.cache_read,
    )


def quota(msg: pb.Quota) -> Quota:
    """A Quota message as a Quota (an unset unit fails validation)."""
    return Quota(
        tenant_id=msg.tenant_id,
        requests_per_minute=msg.requests_per_minute,
        tokens_per_minute=msg.tokens_per_minute,
        concurrent_calls=msg.concurrent_calls,
        budgets=tuple(
            BudgetSpec(
                UNITS.get(b.unit, ""), b.limit, PERIODS.get(b.period, periods.MONTH), b.mode != pb.BUDGET_MODE_SOFT
            )
            for b in msg.budgets
        ),
    )


def budget_msg(spec: BudgetSpec) -> pb.Budget:
    """A BudgetSpec as a Budget message."""
    return pb.Budget(
        unit=UNIT_ENUMS[spec.unit],
        limit=spec.limit,
        period=PERIOD_ENUMS[spec.period],
        mode=pb.BUDGET_MODE_HARD if spec.hard else pb.BUDGET_MODE_SOFT,
    )


def quota_msg(value: Quota) -> pb.Quota:
    """A Quota as a Quota message."""
    msg = pb.Quota(
        tenant_id=value.tenant_id,
        requests_per_minute=value.requests_per_minute,
        tokens_per_minute=value.tokens_per_minute,
        concurrent_calls=value.concurrent_calls,
        budgets=[budget_msg(b) for b in value.budgets],
    )
    if value.updated_us:
        msg.update_time.CopyFrom(timestamp(value.updated_us))
    return msg


def budget_status(state: BudgetState) -> pb.BudgetStatus:
    """A BudgetState as a BudgetStatus message."""
    return pb.BudgetStatus(
        budget=budget_msg(state.spec),
        period_start=timestamp(state.period_start_us),
        period_end=timestamp(state.period_end_us),
        used=state.used,
        held=state.held,
        remaining=state.remaining,
    )


def hold(amounts: Amounts) -> pb.Hold:
    """Amounts as a Hold message."""
    return pb.Hold(tokens=amounts.tokens, micro_usd=amounts.micro_usd)


def lease(info: LeaseInfo) -> pb.Lease:
    """A LeaseInfo as a Lease message."""
    return pb.Lease(
        lease_id=info.lease_id,
        model=info.model,
        granted=hold(info.granted),
        spent=token_counts(info.spent),
        expire_time=timestamp(info.expires_us),
        holder=info.holder,
        in_flight_tokens=info.in_flight_tokens,
    )

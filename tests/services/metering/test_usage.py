"""RecordUsage and QueryUsage: idempotency, exact cost at each event's price, grouping, isolation."""

from __future__ import annotations

from decimal import Decimal

import grpc
import pytest

from bulkhead.metering.v1 import metering_pb2 as pb
from services.metering import periods
from shared.errors import error_details

from .helpers import T0, day_range, event, price, ts

A, B = "t_alpha", "t_bravo"
HOUR, DAY = periods.US_PER_HOUR, periods.US_PER_DAY


async def _totals(h, tenant=A, group_by=(), flt=None):
    resp = await h.stub.QueryUsage(
        pb.QueryUsageRequest(filter=flt or day_range(), group_by=group_by), metadata=h.md(tenant)
    )
    return list(resp.rows)


async def test_same_batch_three_times_counts_once(metering):
    """A batch sent three times is stored once; the repeats report duplicates."""
    batch = pb.RecordUsageRequest(events=[event(f"req-{i}") for i in range(5)])
    first = await metering.stub.RecordUsage(batch, metadata=metering.md(A))
    again = [await metering.stub.RecordUsage(batch, metadata=metering.md(A)) for _ in range(2)]
    assert (first.recorded_count, first.duplicate_count) == (5, 0)
    assert all((r.recorded_count, r.duplicate_count) == (0, 5) for r in again)
    [row] = await _totals(metering)
    assert row.event_count == 5 and row.tokens.input_tokens == 500 and row.tokens.output_tokens == 50


async def test_overlapping_batches_count_each_key_once(metering):
    """Two batches sharing keys (and a key repeated inside one batch) count every key once."""
    one = pb.RecordUsageRequest(events=[event(f"k{i}") for i in range(0, 6)])
    two = pb.RecordUsageRequest(events=[event(f"k{i}") for i in range(4, 10)] + [event("k9")])
    r1 = await metering.stub.RecordUsage(one, metadata=metering.md(A))
    r2 = await metering.stub.RecordUsage(two, metadata=metering.md(A))
    assert (r1.recorded_count, r2.recorded_count, r2.duplicate_count) == (6, 4, 3)
    [row] = await _totals(metering)
    assert row.event_count == 10


async def test_same_key_in_two_tenants_is_two_events(metering):
    """Idempotency keys are per tenant: B's key equal to A's is B's own event."""
    await metering.stub.RecordUsage(pb.RecordUsageRequest(events=[event("shared")]), metadata=metering.md(A))
    resp = await metering.stub.RecordUsage(pb.RecordUsageRequest(events=[event("shared")]), metadata=metering.md(B))
    assert resp.recorded_count == 1


async def test_invalid_batch_writes_nothing(metering):
    """One bad event rejects the whole batch with field violations, and nothing is stored."""
    bad = event("ok-2")
    bad.tokens.output_tokens = -1
    batch = pb.RecordUsageRequest(events=[event("ok-1"), bad, pb.UsageEvent(model="m", occur_time=ts(T0))])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await metering.stub.RecordUsage(batch, metadata=metering.md(A))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error_details(err.value)
    assert details["reason"] == "INVALID_USAGE"
    assert set(details["bad_request"]) == {"events[1].tokens.output_tokens", "events[2].idempotency_key"}
    assert await _totals(metering) == []


async def test_empty_batch_is_invalid(metering):
    """An empty batch is refused."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await metering.stub.RecordUsage(pb.RecordUsageRequest(), metadata=metering.md(A))
    assert error_details(err.value)["bad_request"] == {"events": "at least one event is required"}


async def test_cost_uses_the_price_in_force_at_each_event(metering):
    """Cost of a known event set equals the hand-computed figure across a mid-period price change."""
    m = "claude-priced"
    change = T0 + 5 * DAY
    await metering.stub.SetPrice(
        pb.SetPriceRequest(price=price(m, T0 - 30 * DAY, 3_000_000, 15_000_000, 3_750_000, 300_000)),
        metadata=metering.op(),
    )
    await metering.stub.SetPrice(
        pb.SetPriceRequest(price=price(m, change, 1_000_000, 5_000_000, 1_250_000, 100_000)), metadata=metering.op()
    )
    events = [
        # Before the change: 1000 in, 500 out, 2000 cache write, 10000 cache read at 3/15/3.75/0.30 USD per Mtok.
        event("e1", model=m, at_us=T0, input_tokens=1000, output_tokens=500, cache_write=2000, cache_read=10000),
        # One microsecond before the change: still the old price.
        event("e2", model=m, at_us=change - 1, input_tokens=1, output_tokens=1),
        # At and after the change: the new price.
        event("e3", model=m, at_us=change, input_tokens=1_000_000, output_tokens=0),
        event("e4", model=m, at_us=change + DAY, input_tokens=0, output_tokens=200_000, cache_read=7),
        # A model with no price counts its tokens as unpriced.
        event("e5", model="unpriced", at_us=T0, input_tokens=40, output_tokens=2),
    ]
    await metering.stub.RecordUsage(pb.RecordUsageRequest(events=events), metadata=metering.md(A))
    old = Decimal(1000 * 3 + 500 * 15 + 2000 * 3.75 + 10000 * 0.3) / 10**6 + Decimal(3 + 15) / 10**6
    new = Decimal(1) + Decimal(200_000 * 5) / 10**6 + Decimal(7) * Decimal("0.1") / 10**6
    assert old == Decimal("0.021018") and new == Decimal("2.0000007")
    rows = {r.model: r for r in await _totals(metering, group_by=[pb.USAGE_GROUPING_MODEL])}
    assert Decimal(rows[m].cost_usd) == old + new == Decimal("2.0210187")
    assert rows["unpriced"].cost_usd == "0" and rows["unpriced"].unpriced_tokens == 42
    by_day = await _totals(
        metering,
        group_by=[pb.USAGE_GROUPING_MODEL, pb.USAGE_GROUPING_DAY],
        flt=pb.UsageFilter(start_time=ts(T0), end_time=ts(T0 + 10 * DAY), model=m),
    )
    assert [(r.period_start.ToMicroseconds() // DAY - T0 // DAY, r.cost_usd) for r in by_day] == [
        (0, "0.021"),
        (5, "1.000018"),
        (6, "1.0000007"),
    ]  # the change is at noon of day 5


async def test_grouping_by_agent_principal_and_hour(metering):
    """Rows split by agent, principal and hour; an empty principal is the caller's own."""
    events = [
        event("a1", agent_id="planner", at_us=T0),
        event("a2", agent_id="planner", at_us=T0 + HOUR),
        event("a3", agent_id="coder", at_us=T0 + 10, principal_id="p_other"),
        event("a4", at_us=T0 + 20, outcome=pb.OUTCOME_ERROR),
    ]
    await metering.stub.RecordUsage(pb.RecordUsageRequest(events=events), metadata=metering.md(A, principal_id="p_me"))
    rows = await _totals(
        metering, group_by=[pb.USAGE_GROUPING_AGENT, pb.USAGE_GROUPING_PRINCIPAL, pb.USAGE_GROUPING_HOUR]
    )
    got = sorted(
        (r.agent_id, r.principal_id, r.period_start.ToMicroseconds() - T0, r.event_count, r.error_count) for r in rows
    )
    assert got == [
        ("", "p_me", 0, 1, 1),
        ("coder", "p_other", 0, 1, 0),
        ("planner", "p_me", 0, 1, 0),
        ("planner", "p_me", HOUR, 1, 0),
    ]


async def test_time_range_is_start_inclusive_end_exclusive(metering):
    """Events at the end of the range are left out; at the start, included."""
    await metering.stub.RecordUsage(
        pb.RecordUsageRequest(events=[event("s", at_us=T0), event("e", at_us=T0 + HOUR)]), metadata=metering.md(A)
    )
    [row] = await _totals(metering, flt=pb.UsageFilter(start_time=ts(T0), end_time=ts(T0 + HOUR)))
    assert row.event_count == 1


async def test_query_pages_through_rows(metering):
    """page_size and page_token walk every row exactly once."""
    events = [event(f"p{i}", agent_id=f"agent-{i:02d}") for i in range(7)]
    await metering.stub.RecordUsage(pb.RecordUsageRequest(events=events), metadata=metering.md(A))
    seen, token = [], ""
    while True:
        resp = await metering.stub.QueryUsage(
            pb.QueryUsageRequest(filter=day_range(), group_by=[pb.USAGE_GROUPING_AGENT], page_size=3, page_token=token),
            metadata=metering.md(A),
        )
        seen += [r.agent_id for r in resp.rows]
        token = resp.next_page_token
        if not token:
            break
    assert seen == [f"agent-{i:02d}" for i in range(7)]


@pytest.mark.parametrize(
    "request_, field, reason",
    [
        (pb.QueryUsageRequest(filter=pb.UsageFilter(start_time=ts(T0))), "filter.end_time", "INVALID_QUERY"),
        (
            pb.QueryUsageRequest(filter=pb.UsageFilter(start_time=ts(T0), end_time=ts(T0))),
            "filter.end_time",
            "INVALID_QUERY",
        ),
        (
            pb.QueryUsageRequest(filter=day_range(), group_by=[pb.USAGE_GROUPING_DAY, pb.USAGE_GROUPING_HOUR]),
            "group_by",
            "INVALID_QUERY",
        ),
        (
            pb.QueryUsageRequest(filter=day_range(), group_by=[pb.USAGE_GROUPING_UNSPECIFIED]),
            "group_by",
            "INVALID_QUERY",
        ),
        (pb.QueryUsageRequest(filter=day_range(), page_token="garbage"), "page_token", "INVALID_PAGE_TOKEN"),
    ],
)
async def test_bad_queries_are_refused_precisely(metering, request_, field, reason):
    """Malformed queries fail with INVALID_ARGUMENT naming the field."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await metering.stub.QueryUsage(request_, metadata=metering.md(A))
    details = error_details(err.value)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (details["reason"], field in details["bad_request"]) == (reason, True)


async def test_tenants_see_only_their_own_usage(metering):
    """B's query never includes A's events, whatever B filters on."""
    await metering.stub.RecordUsage(
        pb.RecordUsageRequest(events=[event("x", agent_id="shared-name")]), metadata=metering.md(A)
    )
    await metering.stub.RecordUsage(pb.RecordUsageRequest(events=[event("y", input_tokens=1)]), metadata=metering.md(B))
    rows = await _totals(metering, tenant=B, group_by=[pb.USAGE_GROUPING_AGENT])
    assert [(r.tenant_id, r.agent_id, r.tokens.input_tokens) for r in rows] == [(B, "", 1)]
    filtered = pb.UsageFilter(start_time=day_range().start_time, end_time=day_range().end_time, agent_id="shared-name")
    assert await _totals(metering, tenant=B, flt=filtered) == []


async def test_usage_rpcs_need_their_scopes(metering):
    """A token without metering.usage.* cannot record or read usage."""
    md = metering.md(A, scopes=("metering.budget.write",))
    for call, req in (
        (metering.stub.RecordUsage, pb.RecordUsageRequest(events=[event("z")])),
        (metering.stub.QueryUsage, pb.QueryUsageRequest(filter=day_range())),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(req, metadata=md)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

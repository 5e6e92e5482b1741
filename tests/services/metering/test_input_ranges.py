"""Counts beyond what a ledger can sum are refused at the edge, naming the field (issue: INTERNAL on 2**62)."""

from __future__ import annotations

import grpc
import pytest

from bulkhead.metering.v1 import metering_pb2 as pb
from shared.errors import error_details

from .test_budgets import A, _quota, _reserve, _tokens

HUGE = 4611686018427387904  # 2**62: two of them overflow a 64-bit sum


async def _refused(call) -> dict:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return error_details(caught.value)


@pytest.mark.parametrize(
    "usage",
    [
        pb.TokenCounts(input_tokens=HUGE, output_tokens=HUGE),
        pb.TokenCounts(input_tokens=2**63 - 1, output_tokens=1),
    ],
)
async def test_commit_with_overflowing_counts_is_invalid_argument(metering, usage):
    """CommitBudget with counts near 2**63, for an unknown and a real reservation: INVALID_ARGUMENT naming the field."""
    await metering.stub.SetQuota(_quota(A, _tokens(1000)), metadata=metering.op())
    real = (await _reserve(metering, 100, 200)).reservation_id
    for reservation_id in ("x", real):
        details = await _refused(
            metering.stub.CommitBudget(
                pb.CommitBudgetRequest(reservation_id=reservation_id, usage=usage), metadata=metering.md(A)
            )
        )
        assert "usage.input_tokens" in details["bad_request"], details
    status = await metering.stub.GetQuotaStatus(pb.GetQuotaStatusRequest(), metadata=metering.md(A))
    assert status.budgets[0].held == 300  # the refused commits left the reservation as it was


@pytest.mark.parametrize("method", ["RenewLease", "ReleaseLease"])
@pytest.mark.parametrize(("value", "reason"), [(HUGE, "VALUE_OUT_OF_RANGE"), (2**40, "INVALID_USAGE")])
async def test_lease_spend_out_of_range_is_invalid_argument(metering, method, value, reason):
    """RenewLease / ReleaseLease with all four spent fields at 2**62 (the interceptor) or 2**40 (the
    metering maximum): INVALID_ARGUMENT naming each field."""
    spent = pb.TokenCounts(input_tokens=value, output_tokens=value, cache_write_tokens=value, cache_read_tokens=value)
    request = getattr(pb, f"{method}Request")(lease_id="l_x", spent=spent)
    details = await _refused(getattr(metering.stub, method)(request, metadata=metering.md(A)))
    assert set(details["bad_request"]) == {
        f"spent.{k}" for k in ("input_tokens", "output_tokens", "cache_write_tokens", "cache_read_tokens")
    }
    assert details["reason"] == reason


async def test_beyond_2_53_is_refused_by_the_interceptor(metering):
    """Past 2**53 - 1 (what every client language carries exactly) the interceptor refuses before any handler."""
    details = await _refused(
        metering.stub.ReserveBudget(
            pb.ReserveBudgetRequest(model="m", prompt_tokens=2**53, max_output_tokens=1), metadata=metering.md(A)
        )
    )
    assert details["reason"] == "VALUE_OUT_OF_RANGE"
    assert list(details["bad_request"]) == ["prompt_tokens"]


async def test_usage_event_counts_are_bounded(metering):
    """RecordUsage with a count above the per-call maximum is refused whole, naming the event's field."""
    event = pb.UsageEvent(idempotency_key="k1", model="m", tokens=pb.TokenCounts(output_tokens=10**12))
    event.occur_time.GetCurrentTime()
    details = await _refused(metering.stub.RecordUsage(pb.RecordUsageRequest(events=[event]), metadata=metering.md(A)))
    assert any(f.endswith("tokens.output_tokens") for f in details["bad_request"]), details


async def test_an_occur_time_past_the_year_9999_is_refused_naming_the_event(metering):
    """A Timestamp later than protobuf's latest (its microseconds would overflow the ledger's 64-bit column) is
    INVALID_ARGUMENT for that event's occur_time, and nothing of the batch is recorded."""
    fine = pb.UsageEvent(idempotency_key="k-fine", model="m", tokens=pb.TokenCounts(output_tokens=1))
    fine.occur_time.GetCurrentTime()
    far = pb.UsageEvent(idempotency_key="k-far", model="m", tokens=pb.TokenCounts(output_tokens=1))
    far.occur_time.seconds = 2**53 - 1
    details = await _refused(
        metering.stub.RecordUsage(pb.RecordUsageRequest(events=[fine, far]), metadata=metering.md(A))
    )
    assert details["reason"] == "INVALID_USAGE" and list(details["bad_request"]) == ["events[1].occur_time"]
    retry = await metering.stub.RecordUsage(pb.RecordUsageRequest(events=[fine]), metadata=metering.md(A))
    assert (retry.recorded_count, retry.duplicate_count) == (1, 0)  # the refused batch wrote nothing

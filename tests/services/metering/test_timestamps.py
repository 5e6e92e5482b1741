"""Timestamps outside what protobuf can convert are refused at the edge, naming the field (found by the
isolation fuzzer: QueryUsage with filter.start_time one second before year 1 answered INTERNAL)."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from bulkhead.metering.v1 import metering_pb2 as pb
from shared.errors import error_details

A = "t_alpha"
GOOD = Timestamp(seconds=1_700_000_000)
BAD = [Timestamp(seconds=-62135596801), Timestamp(seconds=253402300800), Timestamp(seconds=1, nanos=-27)]


async def _refused(call) -> dict:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return error_details(caught.value)


@pytest.mark.parametrize("bad", BAD, ids=["before-year-1", "after-9999", "negative-nanos"])
@pytest.mark.parametrize("end", [False, True], ids=["start", "end"])
async def test_query_usage_with_an_invalid_timestamp_is_invalid_argument(metering, bad, end):
    """QueryUsage, QueryTenantUsage and ExportChargeback: INVALID_TIMESTAMP naming the field, never INTERNAL."""
    start, stop = (GOOD, bad) if end else (bad, GOOD)
    name = "end_time" if end else "start_time"
    calls = [
        (
            f"filter.{name}",
            metering.stub.QueryUsage(
                pb.QueryUsageRequest(filter=pb.UsageFilter(start_time=start, end_time=stop)), metadata=metering.md(A)
            ),
        ),
        (
            f"filter.{name}",
            metering.stub.QueryTenantUsage(
                pb.QueryTenantUsageRequest(filter=pb.UsageFilter(start_time=start, end_time=stop)),
                metadata=metering.op(),
            ),
        ),
        (
            name,
            metering.stub.ExportChargeback(
                pb.ExportChargebackRequest(start_time=start, end_time=stop), metadata=metering.op()
            ),
        ),
    ]
    for field, call in calls:
        details = await _refused(call)
        assert details["reason"] == "INVALID_TIMESTAMP" and field in details["bad_request"], details


async def test_set_price_with_an_invalid_effective_time_is_invalid_argument(metering):
    """SetPrice: the price's effective_time out of range is INVALID_TIMESTAMP naming price.effective_time."""
    price = pb.Price(model="claude-x", effective_time=BAD[1], input_micros_per_mtok=1)
    details = await _refused(metering.stub.SetPrice(pb.SetPriceRequest(price=price), metadata=metering.op()))
    assert details["reason"] == "INVALID_TIMESTAMP" and "price.effective_time" in details["bad_request"], details

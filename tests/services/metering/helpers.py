"""Helpers for the metering tests: a fake clock and message builders."""

from __future__ import annotations

import datetime as dt

from bulkhead.metering.v1 import metering_pb2 as pb
from services.metering import periods
from services.metering.wire import timestamp

T0 = periods.from_datetime(dt.datetime(2026, 3, 10, 12, 0, tzinfo=dt.UTC))
"""The fake clock's start: mid-month, mid-day, so periods are easy to reason about."""

OPERATOR = "t_platform"


class FakeClock:
    """A clock the test moves by hand (no sleeping, no wall-clock assertions)."""

    def __init__(self, start_us: int = T0):
        self.now = start_us

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += int(seconds * periods.US_PER_SECOND)


def ts(us: int):
    """Epoch microseconds as a Timestamp."""
    return timestamp(us)


def event(
    key: str,
    *,
    model: str = "claude-test",
    at_us: int = T0,
    input_tokens: int = 100,
    output_tokens: int = 10,
    cache_write: int = 0,
    cache_read: int = 0,
    agent_id: str = "",
    principal_id: str = "",
    outcome: int = pb.OUTCOME_SUCCESS,
) -> pb.UsageEvent:
    """A usage event."""
    return pb.UsageEvent(
        idempotency_key=key,
        model=model,
        occur_time=ts(at_us),
        agent_id=agent_id,
        principal_id=principal_id,
        outcome=outcome,
        tokens=pb.TokenCounts(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cache_write_tokens=cache_write,
            cache_read_tokens=cache_read,
        ),
    )


def price(
    model: str, at_us: int, input_micros: int, output_micros: int, cache_write: int = 0, cache_read: int = 0
) -> pb.Price:
    """A price version."""
    return pb.Price(
        model=model,
        effective_time=ts(at_us),
        input_micros_per_mtok=input_micros,
        output_micros_per_mtok=output_micros,
        cache_write_micros_per_mtok=cache_write,
        cache_read_micros_per_mtok=cache_read,
    )


async def price_and_budget(stub, op_metadata, tenant_id: str, model: str, token_limit: int) -> None:
    """Price `model` and give the tenant a token budget and a (roomy) money budget: every hold and
    settlement then moves two counter rows at once."""
    await stub.SetPrice(pb.SetPriceRequest(price=price(model, T0 - 1, 3_000_000, 15_000_000)), metadata=op_metadata)
    budgets = [
        pb.Budget(unit=pb.BUDGET_UNIT_TOKENS, limit=token_limit),
        pb.Budget(unit=pb.BUDGET_UNIT_MICRO_USD, limit=10**9),
    ]
    await stub.SetQuota(pb.SetQuotaRequest(quota=pb.Quota(tenant_id=tenant_id, budgets=budgets)), metadata=op_metadata)


def day_range(start_us: int = T0 - 30 * periods.US_PER_DAY, days: int = 60) -> pb.UsageFilter:
    """A wide filter around T0."""
    return pb.UsageFilter(start_time=ts(start_us), end_time=ts(start_us + days * periods.US_PER_DAY))

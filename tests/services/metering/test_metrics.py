"""Prometheus counters: tokens, calls, cost and rejections by tenant and model; repeats are not counted."""

from __future__ import annotations

import grpc
import pytest

from bulkhead.metering.v1 import metering_pb2 as pb

from .helpers import T0, event, price

A = "t_alpha"


def _value(h, name: str, **labels) -> float:
    return h.registry.get_sample_value(name, labels) or 0.0


async def test_recorded_usage_is_counted_once(metering):
    """Tokens, calls and cost of new events are counted; a repeated batch adds nothing."""
    await metering.stub.SetPrice(
        pb.SetPriceRequest(price=price("m", T0 - 1, 2_000_000, 10_000_000)), metadata=metering.op()
    )
    batch = pb.RecordUsageRequest(
        events=[
            event("a", model="m", input_tokens=1000, output_tokens=100),
            event("b", model="m", input_tokens=500, output_tokens=0, outcome=pb.OUTCOME_ERROR),
        ]
    )
    for _ in range(2):
        await metering.stub.RecordUsage(batch, metadata=metering.md(A))
    assert _value(metering, "bulkhead_metering_tokens_total", tenant=A, model="m", kind="input") == 1500
    assert _value(metering, "bulkhead_metering_tokens_total", tenant=A, model="m", kind="output") == 100
    assert _value(metering, "bulkhead_metering_requests_total", tenant=A, model="m", outcome="success") == 1
    assert _value(metering, "bulkhead_metering_requests_total", tenant=A, model="m", outcome="error") == 1
    assert _value(metering, "bulkhead_metering_cost_usd_total", tenant=A, model="m") == pytest.approx(0.004)


async def test_rejections_are_counted(metering):
    """A refused reservation counts as a rejection for its tenant and model."""
    await metering.stub.SetQuota(
        pb.SetQuotaRequest(quota=pb.Quota(tenant_id=A, budgets=[pb.Budget(unit=pb.BUDGET_UNIT_TOKENS, limit=5)])),
        metadata=metering.op(),
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await metering.stub.ReserveBudget(pb.ReserveBudgetRequest(model="m", prompt_tokens=6), metadata=metering.md(A))
    assert _value(metering, "bulkhead_metering_rejections_total", tenant=A, model="m", reason="budget_tokens") == 1


def test_a_second_metering_in_one_registry_shares_its_counters():
    """Two meterings in one process (two meshes in one test run) register the counters once and count
    into the same ones; a fresh registry gets its own."""
    from prometheus_client import CollectorRegistry

    from services.metering.meters import MeteringMetrics
    from services.metering.pricing import Tokens
    from shared.metrics import tenant_label

    registry = CollectorRegistry()
    first, second = MeteringMetrics(registry), MeteringMetrics(registry)  # no DuplicateTimeseries
    first.recorded(A, "m", "success", Tokens(input=10), 0.0)
    second.recorded(A, "m", "success", Tokens(input=5), 0.0)
    assert (
        registry.get_sample_value(
            "bulkhead_metering_tokens_total", {"tenant": tenant_label(A), "model": "m", "kind": "input"}
        )
        == 15
    )
    other = CollectorRegistry()
    MeteringMetrics(other).recorded(A, "m", "success", Tokens(input=1), 0.0)
    assert (
        other.get_sample_value(
            "bulkhead_metering_tokens_total", {"tenant": tenant_label(A), "model": "m", "kind": "input"}
        )
        == 1
    )

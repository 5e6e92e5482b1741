"""Overview figures from list/query RPC results."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from bulkhead.metering.v1 import metering_pb2 as mtr
from bulkhead.orchestrator.v1 import orchestrator_pb2 as orc
from console import _figures, usage_csv


def test_agent_figures_from_usage_and_run_stats():
    """Uptime and error rate come from QueryUsage counts; run success and latency from GetRunStats."""
    usage = [mtr.UsageRow(agent_id="triage", event_count=4, error_count=1, cost_usd="0.5")]
    stats = [
        orc.AgentRunStats(
            agent="triage",
            succeeded=1,
            failed=1,
            running=2,
            latency_steps=2,
            step_latency_p50_ms=100,
            step_latency_p95_ms=250,
        ),
        orc.AgentRunStats(agent="billing", queued=1),
    ]
    billing, triage = _figures.agent_figures(usage, stats)
    assert (triage.uptime, triage.error_rate, triage.run_success, triage.runs) == (75.0, 25.0, 25.0, 4)
    assert (triage.p50_ms, triage.p95_ms, triage.latency_steps) == (100, 250, 2)
    assert (billing.calls, billing.runs, billing.p50_ms, billing.uptime) == (0, 1, None, None)
    assert _figures.stats_status_counts(stats) == {
        "queued": 1,
        "running": 2,
        "succeeded": 1,
        "failed": 1,
        "cancelled": 0,
    }


def test_quota_refusals_pick_quota_reasons():
    """Only failed runs refused by a quota, rate limit or budget are listed."""
    runs = [
        orc.Run(status=orc.RUN_STATUS_FAILED, error_reason="BUDGET_EXHAUSTED"),
        orc.Run(status=orc.RUN_STATUS_FAILED, error_reason="MAX_STEPS"),
        orc.Run(status=orc.RUN_STATUS_SUCCEEDED),
    ]
    assert [r.error_reason for r in _figures.quota_refusals(runs)] == ["BUDGET_EXHAUSTED"]


def test_usage_csv_matches_cli_writer(tmp_path):
    """The console's CSV is the file `bulkhead usage query --csv` writes for the same rows."""
    from bulkhead_cli.usage import QUERY_HEADERS, query_rows, write_csv

    rows = query_rows([mtr.UsageRow(tenant_id="t_1", model="m", event_count=2, cost_usd="0.1")], hourly=False)
    write_csv(str(tmp_path / "cli.csv"), QUERY_HEADERS, rows)
    assert usage_csv(rows).encode() == (tmp_path / "cli.csv").read_bytes()


def _row(day: int, model: str, agent: str, calls: int, cost: str) -> mtr.UsageRow:
    return mtr.UsageRow(
        tenant_id="t_1",
        period_start=Timestamp(seconds=day * 86400),
        model=model,
        agent_id=agent,
        event_count=calls,
        error_count=calls // 2,
        cost_usd=cost,
        tokens=mtr.TokenCounts(input_tokens=calls * 10, output_tokens=calls),
    )


def test_roll_up_sums_fine_rows_exactly():
    """Day x model x agent rows summed per model, per agent and per day: counts, tokens and decimal cost exact."""
    fine = [
        _row(2, "m2", "a", 1, "0.1"),
        _row(1, "m1", "a", 2, "0.2"),
        _row(1, "m2", "b", 3, "0.0000001"),
        _row(2, "m1", "b", 4, "0.7"),
    ]
    by_model = _figures.roll_up(fine, "model")
    assert [(r.model, r.event_count, r.error_count, r.cost_usd) for r in by_model] == [
        ("m1", 6, 3, "0.9"),
        ("m2", 4, 1, "0.1000001"),
    ]
    assert by_model[0].tokens.input_tokens == 60 and by_model[0].agent_id == ""
    by_day = _figures.roll_up(fine, "day")
    assert [(r.period_start.seconds, r.event_count, r.cost_usd) for r in by_day] == [
        (86400, 5, "0.2000001"),
        (172800, 5, "0.8"),
    ]
    assert [r.agent_id for r in _figures.roll_up(fine, "agent")] == ["a", "b"]
    assert _figures.usd(_figures.total_cost(fine)) == "1.0000001" and _figures.roll_up([], "model") == []

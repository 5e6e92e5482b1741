"""Overview figures computed from what the list/query RPCs return (no new RPC needed; pure functions)."""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal

from bulkhead.metering.v1 import metering_pb2 as mtr
from bulkhead.orchestrator.v1 import orchestrator_pb2 as orc

QUOTA_REASONS = frozenset({"QUOTA_EXCEEDED", "RATE_LIMITED", "BUDGET_EXHAUSTED", "UPSTREAM_RATE_LIMITED"})
"""Run error reasons that mean a quota, rate limit or budget refused a model call."""


@dataclass(frozen=True)
class AgentFigures:
    """One agent's health in a window."""

    agent: str
    """The agent's name (empty: calls made by no agent)."""
    calls: int
    """Model calls metered for the agent."""
    call_errors: int
    """Of those, how many did not succeed (errors and refusals)."""
    cost_usd: Decimal
    """What the calls cost."""
    runs: int
    """Runs the agent started (as entry agent)."""
    runs_succeeded: int
    """Of those, how many succeeded."""
    p50_ms: float | None
    """Median step latency, from the sampled runs' step times."""
    p95_ms: float | None
    """95th percentile step latency."""
    steps_sampled: int
    """How many step latencies the percentiles are from."""

    @property
    def uptime(self) -> float | None:
        """Share of the agent's model calls that succeeded, in percent."""
        return 100.0 * (self.calls - self.call_errors) / self.calls if self.calls else None

    @property
    def error_rate(self) -> float | None:
        """Share of the agent's model calls that failed, in percent."""
        return 100.0 * self.call_errors / self.calls if self.calls else None

    @property
    def run_success(self) -> float | None:
        """Share of the runs it started that succeeded, in percent."""
        return 100.0 * self.runs_succeeded / self.runs if self.runs else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of values, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _ms(ts) -> float:
    return ts.seconds * 1000.0 + ts.nanos / 1e6


def step_latencies(steps: Iterable[orc.Step]) -> dict[str, list[float]]:
    """agent -> milliseconds each of its steps took (time since the step before it, in the same run)."""
    out: dict[str, list[float]] = defaultdict(list)
    ordered = sorted(steps, key=lambda s: s.index)
    for prev, step in zip(ordered, ordered[1:]):
        if step.kind == orc.STEP_KIND_RUN_FINISHED:
            continue
        out[step.agent].append(max(0.0, _ms(step.create_time) - _ms(prev.create_time)))
    return out


def agent_figures(usage_by_agent: Sequence[mtr.UsageRow], runs: Sequence[orc.Run],
                  latencies: dict[str, list[float]]) -> list[AgentFigures]:
    """Per agent: usage counts from QueryUsage, run outcomes from ListRuns, latency from sampled steps."""
    names = {r.agent_id for r in usage_by_agent} | {r.entry_agent for r in runs} | set(latencies)
    usage = {r.agent_id: r for r in usage_by_agent}
    figures = []
    for name in sorted(names):
        row = usage.get(name)
        started = [r for r in runs if r.entry_agent == name]
        lat = latencies.get(name, [])
        figures.append(AgentFigures(
            agent=name, calls=row.event_count if row else 0, call_errors=row.error_count if row else 0,
            cost_usd=Decimal(row.cost_usd or "0") if row else Decimal(0), runs=len(started),
            runs_succeeded=sum(r.status == orc.RUN_STATUS_SUCCEEDED for r in started),
            p50_ms=percentile(lat, 50), p95_ms=percentile(lat, 95), steps_sampled=len(lat)))
    return figures


def quota_refusals(runs: Iterable[orc.Run]) -> list[orc.Run]:
    """Runs that ended because a quota, rate limit or budget refused them, newest first."""
    return [r for r in runs if r.status == orc.RUN_STATUS_FAILED and r.error_reason in QUOTA_REASONS]


def status_counts(runs: Iterable[orc.Run]) -> dict[str, int]:
    """Runs by status name (queued, running, succeeded, failed, cancelled)."""
    counts = {name: 0 for name in ("queued", "running", "succeeded", "failed", "cancelled")}
    for r in runs:
        counts[status_name(r.status)] = counts.get(status_name(r.status), 0) + 1
    return counts


def status_name(value: int) -> str:
    """RUN_STATUS_SUCCEEDED -> succeeded."""
    return orc.RunStatus.Name(value).removeprefix("RUN_STATUS_").lower()


def total_cost(rows: Iterable[mtr.UsageRow]) -> Decimal:
    """Sum of the rows' exact decimal costs."""
    return sum((Decimal(r.cost_usd or "0") for r in rows), Decimal(0))


@dataclass(frozen=True)
class BudgetFigures:
    """One budget of the tenant in its current period."""

    unit: str
    """tokens or usd."""
    period: str
    """day or month."""
    mode: str
    """hard or soft."""
    limit: float
    """Most that may be used this period, in the unit (USD for money budgets)."""
    used: float
    """Charged this period."""
    held: float
    """Held by open reservations and leases."""
    remaining: float
    """Headroom: what may still be reserved."""


def budget_figures(status: mtr.GetQuotaStatusResponse) -> list[BudgetFigures]:
    """The tenant's budgets as plain numbers (micro-USD shown as USD)."""
    out = []
    for b in status.budgets:
        scale = 1e6 if b.budget.unit == mtr.BUDGET_UNIT_MICRO_USD else 1.0
        out.append(BudgetFigures(
            unit="usd" if scale != 1.0 else "tokens",
            period="day" if b.budget.period == mtr.BUDGET_PERIOD_DAY else "month",
            mode="soft" if b.budget.mode == mtr.BUDGET_MODE_SOFT else "hard",
            limit=b.budget.limit / scale, used=b.used / scale, held=b.held / scale, remaining=b.remaining / scale))
    return out


_ROLL_KEYS = {"day": "period_start", "model": "model", "agent": "agent_id", "principal": "principal_id"}


def roll_up(rows: Iterable[mtr.UsageRow], *by: str) -> list[mtr.UsageRow]:
    """QueryUsage rows summed into coarser groups (by: day, model, agent, principal), ordered by group.

    Exact: metering sums integer costs, so the parts' decimal costs add up to the whole's. One fine query
    rolled up here costs the ledger one scan instead of one per chart.
    """
    fields = [_ROLL_KEYS[name] for name in by]
    groups: dict[tuple, list] = {}
    for r in rows:
        key = tuple((r.period_start.seconds, r.period_start.nanos) if f == "period_start" else getattr(r, f)
                    for f in fields)
        if key not in groups:
            out = mtr.UsageRow(tenant_id=r.tenant_id)
            for f in fields:
                (out.period_start.CopyFrom(r.period_start) if f == "period_start" else setattr(out, f, getattr(r, f)))
            groups[key] = [out, Decimal(0)]
        out = groups[key][0]
        out.event_count += r.event_count
        out.error_count += r.error_count
        out.unpriced_tokens += r.unpriced_tokens
        for t in ("input_tokens", "output_tokens", "cache_write_tokens", "cache_read_tokens"):
            setattr(out.tokens, t, getattr(out.tokens, t) + getattr(r.tokens, t))
        groups[key][1] += Decimal(r.cost_usd or "0")
    for out, cost in groups.values():
        out.cost_usd = usd(cost)
    return [groups[key][0] for key in sorted(groups)]


def usd(amount: Decimal) -> str:
    """A plain decimal string without exponent or trailing zeros, as metering writes cost_usd."""
    text = format(amount.normalize(), "f")
    return text if "." not in text else text.rstrip("0").rstrip(".")

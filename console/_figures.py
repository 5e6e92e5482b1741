"""Overview figures from what QueryUsage, GetRunStats and GetQuotaStatus return (pure functions)."""

from __future__ import annotations

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
    """Median step latency over every step of the window (GetRunStats, computed by the orchestrator)."""
    p95_ms: float | None
    """95th percentile step latency."""
    latency_steps: int
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


def agent_figures(usage_by_agent: Sequence[mtr.UsageRow], stats: Sequence[orc.AgentRunStats]) -> list[AgentFigures]:
    """Per agent: usage counts from QueryUsage, run outcomes and step latency from GetRunStats."""
    usage = {r.agent_id: r for r in usage_by_agent}
    runs = {s.agent: s for s in stats}
    figures = []
    for name in sorted(set(usage) | set(runs)):
        row, st = usage.get(name), runs.get(name)
        started = st.succeeded + st.failed + st.cancelled + st.queued + st.running if st else 0
        latency = bool(st and st.latency_steps)
        figures.append(
            AgentFigures(
                agent=name,
                calls=row.event_count if row else 0,
                call_errors=row.error_count if row else 0,
                cost_usd=Decimal(row.cost_usd or "0") if row else Decimal(0),
                runs=started,
                runs_succeeded=st.succeeded if st else 0,
                p50_ms=st.step_latency_p50_ms if st and latency else None,
                p95_ms=st.step_latency_p95_ms if st and latency else None,
                latency_steps=st.latency_steps if st else 0,
            )
        )
    return figures


def quota_refusals(runs: Iterable[orc.Run]) -> list[orc.Run]:
    """Runs that ended because a quota, rate limit or budget refused them, newest first."""
    return [r for r in runs if r.status == orc.RUN_STATUS_FAILED and r.error_reason in QUOTA_REASONS]


STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
"""Run status names, in the order the Overview shows them."""


def status_counts(runs: Iterable[orc.Run]) -> dict[str, int]:
    """Runs by status name (queued, running, succeeded, failed, cancelled)."""
    counts = dict.fromkeys(STATUSES, 0)
    for r in runs:
        counts[status_name(r.status)] = counts.get(status_name(r.status), 0) + 1
    return counts


def stats_status_counts(stats: Iterable[orc.AgentRunStats]) -> dict[str, int]:
    """Runs started in the window by status, summed over GetRunStats' agents."""
    counts = dict.fromkeys(STATUSES, 0)
    for s in stats:
        for name in STATUSES:
            counts[name] += getattr(s, name)
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
        out.append(
            BudgetFigures(
                unit="usd" if scale != 1.0 else "tokens",
                period="day" if b.budget.period == mtr.BUDGET_PERIOD_DAY else "month",
                mode="soft" if b.budget.mode == mtr.BUDGET_MODE_SOFT else "hard",
                limit=b.budget.limit / scale,
                used=b.used / scale,
                held=b.held / scale,
                remaining=b.remaining / scale,
            )
        )
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
        key = tuple(
            (r.period_start.seconds, r.period_start.nanos) if f == "period_start" else getattr(r, f) for f in fields
        )
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

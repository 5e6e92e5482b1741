"""Per-agent run statistics over a window (GetRunStats), computed in SQL from the stored runs and steps.

Figures come from the ledger, never from process memory, so every replica answers the same; the
percentiles are exact (nearest rank over every step of the window), not sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import case, func, select

from services.orchestrator.runs import RunStatus
from services.orchestrator.store import RunRow, StepRow
from shared.db import Database
from shared.errors import InvalidArgument
from shared.tenancy import require_tenant

MAX_WINDOW_SECONDS = 31 * 86400
"""Longest window one call may cover: a month of steps is what the console's 7-day view needs, with room."""


@dataclass(frozen=True)
class AgentStats:
    """One agent's runs (as entry agent) and step latency (as the agent that acted)."""

    agent: str
    """The agent's name."""
    succeeded: int = 0
    """Runs started in the window that succeeded."""
    failed: int = 0
    """Runs started in the window that failed."""
    cancelled: int = 0
    """Runs started in the window that were cancelled."""
    queued: int = 0
    """Runs started in the window queued now."""
    running: int = 0
    """Runs started in the window running now."""
    running_now: int = 0
    """Runs (started any time) running now."""
    queued_now: int = 0
    """Runs (started any time) queued now."""
    latency_steps: int = 0
    """Steps in the window with a latency."""
    p50_ms: float = 0.0
    """Median step latency (nearest rank)."""
    p95_ms: float = 0.0
    """95th percentile step latency (nearest rank)."""


def check_window(start: float | None, end: float | None) -> None:
    """InvalidArgument naming the field when the window is missing, inverted or too long."""
    v: dict[str, str] = {}
    if start is None:
        v["start_time"] = "required"
    if end is None:
        v["end_time"] = "required"
    elif start is not None and end <= start:
        v["end_time"] = "must be after start_time"
    elif start is not None and end - start > MAX_WINDOW_SECONDS:
        v["end_time"] = f"at most {MAX_WINDOW_SECONDS // 86400} days after start_time"
    if v:
        raise InvalidArgument("invalid stats window", violations=v)


class RunStats:
    """The current tenant's run statistics (ORM criteria and RLS scope every query; the explicit
    tenant filter makes the index on (tenant_id, created_at) usable)."""

    def __init__(self, db: Database):
        self._db = db

    async def per_agent(self, start: float | None, end: float | None) -> list[AgentStats]:
        """Every agent with runs started in [start, end), runs unfinished now, or steps in the window."""
        check_window(start, end)
        assert start is not None and end is not None
        tid = require_tenant().tenant_id
        fields: dict[str, dict[str, float | int]] = {}

        def add(agent: str, **values: float | int) -> None:
            row = fields.setdefault(agent, {})
            for k, v in values.items():
                row[k] = row.get(k, 0) + v

        async with self._db.session() as s:
            windowed = await s.execute(
                select(RunRow.entry_agent, RunRow.status, func.count())
                .where(RunRow.tenant_id == tid, RunRow.created_at >= start, RunRow.created_at < end)
                .group_by(RunRow.entry_agent, RunRow.status)
            )
            for agent, status, n in windowed:
                add(agent, **{status: n})
            live = (RunStatus.QUEUED.value, RunStatus.RUNNING.value)
            now = await s.execute(
                select(RunRow.entry_agent, RunRow.status, func.count())
                .where(RunRow.tenant_id == tid, RunRow.status.in_(live))
                .group_by(RunRow.entry_agent, RunRow.status)
            )
            for agent, status, n in now:
                add(agent, **{f"{status}_now": n})
            for agent, n, p50, p95 in await s.execute(_percentiles(tid, start, end)):
                add(agent, latency_steps=n, p50_ms=p50, p95_ms=p95)
        return [AgentStats(agent=a, **v) for a, v in sorted(fields.items())]  # type: ignore[arg-type]


def _percentiles(tid: str, start: float, end: float):
    """agent, n, p50, p95 of the window's step latencies: nearest rank is row ceil(q*n/100) in order,
    which window functions give on SQLite and Postgres alike (neither needs percentile_disc)."""
    ranked = (
        select(
            StepRow.agent,
            StepRow.latency_ms,
            func.row_number().over(partition_by=StepRow.agent, order_by=StepRow.latency_ms).label("rn"),
            func.count().over(partition_by=StepRow.agent).label("n"),
        )
        .where(
            StepRow.tenant_id == tid,
            StepRow.created_at >= start,
            StepRow.created_at < end,
            StepRow.latency_ms.is_not(None),
        )
        .subquery()
    )
    rank50, rank95 = (50 * ranked.c.n + 99) // 100, (95 * ranked.c.n + 99) // 100
    p50 = func.max(case((ranked.c.rn == rank50, ranked.c.latency_ms), else_=None))
    p95 = func.max(case((ranked.c.rn == rank95, ranked.c.latency_ms), else_=None))
    return (
        select(ranked.c.agent, func.max(ranked.c.n), p50, p95)
        .where((ranked.c.rn == rank50) | (ranked.c.rn == rank95))
        .group_by(ranked.c.agent)
    )

"""The performance targets bench/all.py judges figures against: issue 16's Goals and the targets
earlier issues set, each tied to the figure (`<bench>.<name>`) that a bench script writes."""

from __future__ import annotations

import dataclasses
import math

Figures = dict[str, float | None]


@dataclasses.dataclass(frozen=True)
class Target:
    """A bound on one figure: `figure op limit`, or `figure op plus + limit` when the bound is
    relative to a baseline measured in the same run."""

    figure: str
    """`<bench>.<name>`, as all.py collects it."""
    label: str
    """What a reader of the table needs to know the figure is."""
    op: str
    """"<=" or ">="."""
    limit: float
    """The bound, or the allowance on top of `plus`."""
    plus: str | None = None
    """A baseline figure the bound is relative to (its value + `limit`)."""

    def __post_init__(self) -> None:
        if self.op not in ("<=", ">="):
            raise ValueError(f"op must be <= or >=, not {self.op!r}")

    def bound(self, figures: Figures) -> float | None:
        """The bound in this run; None when its baseline was not measured."""
        if self.plus is None:
            return self.limit
        base = figures.get(self.plus)
        return None if base is None or math.isnan(base) else base + self.limit

    def verdict(self, figures: Figures) -> str:
        """ "met" or "missed"; "n/a" when the figure or its baseline was not measured."""
        value, bound = figures.get(self.figure), self.bound(figures)
        if value is None or bound is None or math.isnan(value):
            return "n/a"
        return "met" if (value <= bound if self.op == "<=" else value >= bound) else "missed"

    def describe(self, figures: Figures) -> str:
        """The bound as the table shows it, e.g. `<= 0.8 ms` or `<= 1.45 ms (baseline 1.25 + 0.2)`."""
        unit, limit = unit_of(self.figure), f"{self.limit:,g}"  # limits are round: print them as written
        if self.plus is None:
            return f"{self.op} {limit}{unit}"
        bound = self.bound(figures)
        if bound is None:
            return f"{self.op} {self.plus} + {limit}{unit}"
        return f"{self.op} {number(bound)}{unit} ({number(bound - self.limit)} + {limit})"


def unit_of(figure: str) -> str:
    """The unit a figure's name ends in, as a suffix for its value."""
    for suffix, unit in (("_ms", " ms"), ("_ms_per_call", " ms"), ("_per_s", "/s"), ("_mb", " MB"), ("_ratio", "x")):
        if figure.endswith(suffix):
            return unit
    return ""


def number(value: float) -> str:
    """A figure rounded for reading: thousands grouped, 3 significant digits or so below 100."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"


TARGETS: tuple[Target, ...] = (
    Target(
        "proxy.bulkhead_c32_server_cpu_ms_per_call",
        "inference CPU/call, c32 (proxy + metering + credentials)",
        "<=",
        0.8,
    ),
    Target("proxy.bulkhead_c32_throughput_ratio", "inference calls/s at c32 / direct", ">=", 0.9),
    Target(
        "proxy.bulkhead_c1_added_p50_ms",
        "inference added p50 at c1 (bound: bare gRPC hop + 0.2)",
        "<=",
        0.2,
        plus="proxy.bare_hop_added_p50_ms",
    ),
    Target(
        "proxy.bulkhead_over_litellm_c32_server_cpu_ratio",
        "CPU/call Bulkhead / LiteLLM at c32 (>= 20x leaner)",
        "<=",
        0.05,
    ),
    Target("proxy.proxy_peak_rss_mb", "inference peak RSS under load", "<=", 150),
    Target("proxy.proxy_idle_rss_mb", "inference idle RSS (started, no call yet)", "<=", 100),
    Target(
        "proxy.budget_2_replicas_over_no_budget_ratio",
        "c32 over 2 replicas: hard budget / no budget calls/s",
        ">=",
        0.9,
    ),
    Target(
        "proxy_direct.bulkhead_c32_server_cpu_ms_per_call",
        "inference CPU/call, c32, opt-in direct transport",
        "<=",
        0.8,
    ),
    Target("proxy_direct.bulkhead_c32_throughput_ratio", "inference c32 / direct, opt-in direct transport", ">=", 0.9),
    Target(
        "proxy_direct.bulkhead_c1_added_p50_ms",
        "inference added p50 at c1, opt-in direct transport",
        "<=",
        0.2,
        plus="proxy_direct.bare_hop_added_p50_ms",
    ),
    Target("proxy_direct.proxy_peak_rss_mb", "inference peak RSS under load, opt-in direct transport", "<=", 150),
    Target("orchestrator.fixed_per_run_ms", "fixed overhead per run", "<=", 10),
    Target("orchestrator.per_step_ms", "overhead per step", "<=", 1),
    Target(
        "orchestrator_pg.concurrent_vs_direct_ratio",
        "100 concurrent runs on Postgres / the direct calls' rate",
        ">=",
        0.8,
    ),
    Target("orchestrator.step_wait_max_over_min_ratio", "fairness: median step wait, max / min tenant", "<=", 2),
    Target("credentials.local_reads_per_s", "GetSecret, local backend (with audit)", ">=", 3000),
    Target("credentials.vault_over_hvac_p50_ratio", "GetSecret on OpenBao p50 / raw hvac read", "<=", 1.5),
    Target("metering.reserve_commit_pairs_per_s", "Reserve+Commit pairs", ">=", 1500),
    Target("metering.ingest_batch1000_events_per_s", "RecordUsage ingest, batch 1000", ">=", 50_000),
    Target("state.sqlite_append_encryption_cost_ratio", "append events/s plaintext / encrypted (SQLite)", "<=", 1.25),
    Target("state.postgres_grpc_append_events_per_s", "batched appends over gRPC (Postgres)", ">=", 5000),
    Target("identity_rss.identity_idle_rss_mb", "identity idle RSS", "<=", 100),
    Target("identity_rss.mesh_max_service_idle_rss_mb", "largest idle RSS of any service (bulkhead up)", "<=", 100),
    Target("attempts.cpu_ms_per_call", "write-ahead attempt record CPU/call", "<=", 0.1),
    Target("console.worst_page_p95_ms", "worst page p95 (big tenant)", "<=", 300),
)


def limit_of(figure: str) -> float:
    """The bound TARGETS sets on `figure` (an absolute one), for a bench that prints its own verdict: one
    source for both it and bench/all.py's table."""
    (target,) = (t for t in TARGETS if t.figure == figure and t.plus is None)
    return target.limit

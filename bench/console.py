#!/usr/bin/env python3
"""Console page render time for a big tenant: 10k runs and 100k usage events (target: p95 <= 300 ms).

Starts `bulkhead up` (SQLite, all seven processes, as the e2e tests do), creates one tenant and fills it:
  usage  100k events through RecordUsage (the real ingest path, batches of 2,000), over the last 7 days,
         4 agents x 2 priced models, 2% errors
  runs   a few real runs through StartRun (so timelines, threads and step latencies are real), plus 10k
         finished runs written straight into the orchestrator's table, older than the real ones: running
         10k runs through the engine would take many minutes on 2 cores, and the console only reads them
Then it signs in like a browser (form + CSRF) and times each page over HTTP, sequentially, after a warm-up.
Baseline, measured in the same run against the same process: /healthz (no mesh call, no template), so
each page's p95 is also printed as a multiple of it. Each page also shows the CPU the console and each
service spent per view (from /proc), and the ledger reads the slowest pages wait on are timed straight
from a gRPC client: on 2 shared cores a page's wall time is about the sum of that CPU. Not part of CI.

    python bench/console.py               # about 2 minutes
    python bench/console.py --quick       # 1k runs, 10k events, fewer samples
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from google.protobuf.timestamp_pb2 import Timestamp  # noqa: E402

from bench._figures import add_json_option, write_json  # noqa: E402
from bulkhead.client import Client  # noqa: E402
from bulkhead.common.v1 import tenancy_pb2  # noqa: E402
from bulkhead.identity.v1 import identity_pb2 as idp  # noqa: E402
from bulkhead.metering.v1 import metering_pb2 as mtr  # noqa: E402
from bulkhead.orchestrator.v1 import orchestrator_pb2 as orc  # noqa: E402
from shared.config import SERVICES, service_addr  # noqa: E402
from tests.e2e.conftest import start_mesh  # noqa: E402

TARGET_MS = 300.0
MODELS = {"claude-sonnet-4-5-20250929": (3_000_000, 15_000_000), "claude-haiku-4-5": (1_000_000, 5_000_000)}
AGENTS = ("triage", "specialist", "billing", "research")
REAL_RUNS = 12
"""Runs made through StartRun: more than the Overview's latency sample (10), so that sample is all real."""
WEEK = 7 * 86400


async def _tenant(operator_key: str, addresses: dict[str, str]) -> tuple[str, str]:
    """A new pooled tenant, with prices for the bench's models; returns (tenant id, admin API key)."""
    async with await Client.connect(api_key=operator_key, addresses=addresses) as op:
        for model, (inp, out) in MODELS.items():
            if not (await op.metering.ListPrices(mtr.ListPricesRequest(model=model))).prices:
                await op.metering.SetPrice(
                    mtr.SetPriceRequest(
                        price=mtr.Price(
                            model=model,
                            effective_time=Timestamp(seconds=int(time.time()) - 30 * 86400),
                            input_micros_per_mtok=inp,
                            output_micros_per_mtok=out,
                        )
                    )
                )
        created = await op.identity.CreateTenant(
            idp.CreateTenantRequest(name=f"bench-{uuid.uuid4().hex[:6]}", tier=tenancy_pb2.TIER_POOLED)
        )
        await op.metering.SetQuota(
            mtr.SetQuotaRequest(
                quota=mtr.Quota(tenant_id=created.tenant.id, requests_per_minute=100_000, tokens_per_minute=10_000_000)
            )
        )
    return created.tenant.id, created.admin_api_key


async def _usage(key: str, addresses: dict[str, str], count: int, now: float) -> float:
    """`count` usage events over the last 7 days, in batches of 2,000, 4 at a time; returns seconds taken."""
    rng = random.Random(7)
    models = list(MODELS)

    def event(i: int) -> mtr.UsageEvent:
        at = now - 120 - rng.random() * (WEEK - 3600)
        return mtr.UsageEvent(
            idempotency_key=f"bench-{i}",
            agent_id=AGENTS[i % len(AGENTS)],
            model=models[1 if i % 3 == 0 else 0],
            run_id=f"r_bench{i % 10_000:019x}",
            latency_ms=rng.randrange(50, 2000),
            outcome=mtr.OUTCOME_ERROR if i % 50 == 0 else mtr.OUTCOME_SUCCESS,
            tokens=mtr.TokenCounts(input_tokens=rng.randrange(50, 2000), output_tokens=rng.randrange(5, 400)),
            occur_time=Timestamp(seconds=int(at), nanos=int(at % 1 * 1e9)),
        )

    batches = [[event(i) for i in range(start, min(count, start + 2000))] for start in range(0, count, 2000)]
    started = time.perf_counter()
    async with await Client.connect(api_key=key, addresses=addresses) as bh:
        limit = asyncio.Semaphore(4)

        async def send(batch):
            async with limit:
                resp = await bh.metering.RecordUsage(mtr.RecordUsageRequest(events=batch), timeout=120)
                assert resp.recorded_count == len(batch), resp

        await asyncio.gather(*(send(b) for b in batches))
    return time.perf_counter() - started


async def _real_runs(key: str, addresses: dict[str, str]) -> list[str]:
    """REAL_RUNS runs of a one-agent team through the orchestrator, watched to their end."""
    team = orc.Team(
        name="support",
        description="bench team",
        agents=[orc.Agent(name="triage", system_prompt="Answer briefly.", max_steps=2)],
    )
    async with await Client.connect(api_key=key, addresses=addresses) as bh:
        await bh.orchestrator.CreateTeam(orc.CreateTeamRequest(team=team))

        async def one(i: int) -> str:
            run = (
                await bh.orchestrator.StartRun(
                    orc.StartRunRequest(
                        team="support", entry_agent="triage", input=f"question {i}", idempotency_key=uuid.uuid4().hex
                    )
                )
            ).run
            async for _ in bh.orchestrator.WatchRun(orc.WatchRunRequest(run_id=run.run_id), timeout=120):
                pass
            return run.run_id

        return list(await asyncio.gather(*(one(i) for i in range(REAL_RUNS))))


def _bulk_runs(db: Path, tenant_id: str, count: int, now: float) -> float:
    """`count` finished runs written straight into the orchestrator's table (the rows a finished run leaves)."""
    rng = random.Random(11)
    spec = json.dumps({"name": "support", "agents": [{"name": "triage"}]})
    rows = []
    for i in range(count):
        at = now - 600 - rng.random() * (WEEK - 3600)
        roll = rng.random()
        status, reason = (
            ("succeeded", "")
            if roll < 0.9
            else ("failed", "BUDGET_EXHAUSTED")
            if roll < 0.95
            else ("failed", "UPSTREAM_ERROR")
            if roll < 0.98
            else ("cancelled", "")
        )
        rows.append(
            (
                f"r_bench{i:019x}",
                tenant_id,
                "support",
                spec,
                AGENTS[i % 2],
                f"question {i}",
                status,
                AGENTS[i % 2],
                "done" if status == "succeeded" else "",
                reason,
                "refused" if reason else "",
                5,
                None,
                at,
                at + rng.random() * 20,
            )
        )
    started = time.perf_counter()
    with sqlite3.connect(db, timeout=30) as conn:
        conn.executemany(
            "INSERT INTO orch_runs (run_id, tenant_id, team, team_spec, entry_agent, input, status, current_agent, "
            "output, error_reason, error_message, step_count, idempotency_key, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    return time.perf_counter() - started


def _sign_in(http: httpx.Client, api_key: str) -> None:
    form = http.get("/signin")
    found = re.search(r'name="csrf" value="([^"]+)"', form.text)
    if found is None:
        raise RuntimeError("the sign-in page has no CSRF field")
    csrf = found.group(1)
    done = http.post("/signin", data={"csrf": csrf, "api_key": api_key})
    assert done.status_code == 303 and done.headers["location"] == "/overview", done.text[:500]


def _cpu_ms(pid: int) -> float:
    """CPU time (user + system) a process has used so far, in ms."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def _time(
    http: httpx.Client, path: str, samples: int, pids: dict[str, int], warmup: int = 2
) -> tuple[list[float], dict[str, float]]:
    """Wall ms of each request, and CPU ms per request of each process (console and services) meanwhile."""
    for _ in range(warmup):
        http.get(path)
    out = []
    cpu_before = {name: _cpu_ms(pid) for name, pid in pids.items()}
    for _ in range(samples):
        started = time.perf_counter()
        resp = http.get(path)
        out.append((time.perf_counter() - started) * 1000)
        assert resp.status_code == 200, (path, resp.status_code, resp.text[:300])
    return out, {name: (_cpu_ms(pid) - cpu_before[name]) / samples for name, pid in pids.items()}


async def _ledger_floors(key: str, addresses: dict[str, str], samples: int, now: float) -> dict[str, list[float]]:
    """The slowest ledger reads the pages wait on, timed straight from a gRPC client (no console in between)."""
    import datetime as dt

    month = dt.datetime.fromtimestamp(now, dt.UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    reads = {
        "QueryUsage day*model*agent, month (Usage)": lambda bh: _query(
            bh, month.timestamp(), now, [mtr.USAGE_GROUPING_DAY, mtr.USAGE_GROUPING_MODEL, mtr.USAGE_GROUPING_AGENT]
        ),
        "QueryUsage agent*model, 7 days (Overview)": lambda bh: _query(
            bh, now - WEEK, now + 60, [mtr.USAGE_GROUPING_AGENT, mtr.USAGE_GROUPING_MODEL]
        ),
        "ListRuns newest 2,000 (Overview 7d)": _runs_2000,
    }
    out: dict[str, list[float]] = {}
    async with await Client.connect(api_key=key, addresses=addresses) as bh:
        for name, read in reads.items():
            await read(bh)
            out[name] = []
            for _ in range(samples):
                started = time.perf_counter()
                await read(bh)
                out[name].append((time.perf_counter() - started) * 1000)
    return out


async def _query(bh, start: float, end: float, group_by: list[mtr.UsageGrouping]) -> None:
    flt = mtr.UsageFilter(start_time=Timestamp(seconds=int(start)), end_time=Timestamp(seconds=int(end)))
    token = ""
    while True:
        resp = await bh.metering.QueryUsage(
            mtr.QueryUsageRequest(filter=flt, group_by=group_by, page_size=1000, page_token=token)
        )
        token = resp.next_page_token
        if not token:
            return


async def _runs_2000(bh) -> None:
    token, seen = "", 0
    while seen < 2000:
        resp = await bh.orchestrator.ListRuns(orc.ListRunsRequest(page_size=500, page_token=token))
        seen += len(resp.runs)
        token = resp.next_page_token
        if not token:
            return


def p95(values: list[float]) -> float:
    """Nearest-rank 95th percentile."""
    ordered = sorted(values)
    return ordered[max(0, -(-95 * len(ordered) // 100) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=30, help="timed requests per page")
    parser.add_argument("--quick", action="store_true", help="1k runs, 10k events, 8 samples")
    add_json_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.runs, args.events, args.samples = 1_000, 10_000, 8

    with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
        data_dir = Path(tmp) / "mesh"
        mesh = start_mesh(data_dir)
        try:
            addresses = {svc: service_addr(svc, mesh.env) for svc in SERVICES}
            operator_key = (data_dir / "operator.key").read_text().strip()
            now = time.time()
            tenant_id, key = asyncio.run(_tenant(operator_key, addresses))
            # Before the bulk usage: once, runs started after it did not finish within 120 s (cause not pinned down).
            real = asyncio.run(_real_runs(key, addresses))
            t_usage = asyncio.run(_usage(key, addresses, args.events, now))
            t_runs = _bulk_runs(data_dir / "orchestrator.db", tenant_id, args.runs, now)
            print(
                f"tenant {tenant_id}: {args.events:,} usage events via RecordUsage in {t_usage:.1f} s, "
                f"{len(real)} real runs + {args.runs:,} finished runs inserted in {t_runs:.1f} s"
            )

            pages = {
                "overview (24h)": "/overview",
                "overview (7d)": "/overview?window=7d",
                "runs": "/runs",
                "runs table (poll)": "/runs/table",
                "run": f"/runs/{real[0]}",
                "threads": "/threads",
                "thread": f"/threads/{real[0]}",
                "usage (month)": "/usage",
                "usage.csv": "/usage.csv",
                "secrets": "/secrets",
                "security": "/security",
                "keys": "/keys",
            }
            with httpx.Client(base_url=f"http://{mesh.env['BULKHEAD_CONSOLE_ADDR']}", timeout=60) as http:
                _sign_in(http, key)
                pids = {
                    name: pid
                    for name, pid in mesh.service_pids().items()
                    if name in ("console", "orchestrator", "metering", "credentials", "identity", "state")
                }
                base, _ = _time(http, "/healthz", args.samples * 2, pids)
                results = {name: _time(http, path, args.samples, pids) for name, path in pages.items()}
            floors = asyncio.run(_ledger_floors(key, addresses, args.samples, now))
        finally:
            mesh.stop()

    base_p95 = p95(base)
    print(f"\nbaseline /healthz: p50 {statistics.median(base):.1f} ms, p95 {base_p95:.1f} ms ({len(base)} requests)\n")
    print(
        f"{'page':<20} {'p50 ms':>8} {'p95 ms':>8} {'x baseline':>11}  {'target':<6}  CPU ms per page view "
        f"(<= {TARGET_MS:.0f} ms p95)"
    )
    worst = 0.0
    for name, (values, cpu) in results.items():
        p = p95(values)
        worst = max(worst, p)
        spent = "  ".join(f"{svc} {ms:.0f}" for svc, ms in sorted(cpu.items(), key=lambda kv: -kv[1]) if ms >= 1)
        print(
            f"{name:<20} {statistics.median(values):>8.1f} {p:>8.1f} {p / base_p95:>10.0f}x  "
            f"{'ok' if p <= TARGET_MS else 'OVER':<6}  {spent}"
        )
    print("\nledger reads behind the slowest pages (gRPC straight to the service, same samples):")
    for name, values in floors.items():
        print(f"{name:<44} p50 {statistics.median(values):>7.1f} ms  p95 {p95(values):>7.1f} ms")
    print(
        f"\nworst page p95 {worst:.1f} ms ({args.samples} requests per page, sequential, one signed-in session; "
        f"{args.runs:,} runs, {args.events:,} usage events)"
    )
    write_json(
        args.json,
        {
            "worst_page_p95_ms": worst,
            "healthz_p95_ms": base_p95,
            **{
                f"{re.sub(r'[^a-z0-9]+', '_', name).strip('_')}_p95_ms": p95(values)
                for name, (values, _) in results.items()
            },
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

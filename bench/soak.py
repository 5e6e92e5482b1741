#!/usr/bin/env python3
"""Soak: a bounded mixed workload over 2 replicas of every service, with kill -9 faults on a schedule.

Starts `bulkhead up --replicas 2` on a throwaway Postgres (or SQLite with --sqlite) and a fake Anthropic
upstream, then runs the workload of tests/e2e/test_replicas.py (runs through the orchestrator, model
calls, secret reads, state appends and reads, usage records) for --minutes, killing one replica every
--interval seconds (services in turn, alternating replicas). Prints calls, errors by code (idempotent
calls, which must see none, apart from the rest, which may fail only UNAVAILABLE and are resent), runs
that did not succeed, each process's RSS drift over its life, and metering's total beside the fake
upstream's billed count (the difference is lost or duplicated usage). Not part of CI.

    python bench/soak.py                  # 10 minutes
    python bench/soak.py --minutes 2      # a short pass
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._figures import add_json_option, write_json  # noqa: E402
from tests.e2e.test_replicas import (  # noqa: E402
    KILL_ORDER,
    Tally,
    Workload,
    matches,
    prepare_tenant,
    replica_pids,
    settled_usage,
    start_replicated,
    wait_for_line,
)


def rss_mb(pid: int) -> float | None:
    """Resident set size of pid in MiB, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class RssLog:
    """First and last RSS seen for each (replica, pid): a restarted replica starts a new life."""

    def __init__(self) -> None:
        self.first: dict[tuple[str, int], tuple[float, float]] = {}
        self.last: dict[tuple[str, int], tuple[float, float]] = {}

    def sample(self, pids: dict[str, int]) -> None:
        now = time.monotonic()
        for label, pid in pids.items():
            mb = rss_mb(pid)
            if mb is not None:
                self.first.setdefault((label, pid), (now, mb))
                self.last[(label, pid)] = (now, mb)

    def rows(self) -> list[tuple[str, int, float, float, float, float]]:
        """(label, pid, minutes observed, first MiB, last MiB, drift MiB) per process life."""
        out = []
        for key, (t0, first) in self.first.items():
            t1, last = self.last[key]
            out.append((*key, (t1 - t0) / 60, first, last, last - first))
        return sorted(out)


def current_pids(mesh, start: dict[str, int]) -> dict[str, int]:
    """Each replica's pid now: from the status table, updated by the supervisor's restart lines."""
    pids = dict(start)
    for m in re.finditer(r"!! (\w+#\d) is healthy again \(pid (\d+)\)", "".join(mesh.lines)):
        pids[m.group(1)] = int(m.group(2))
    return pids


async def soak(minutes: float, interval: float, postgres: tuple[str, str] | None) -> dict[str, float | None]:
    from testkit.fake_anthropic import FakeAnthropic

    up_args = ("--postgres", postgres[0], "--postgres-owner", postgres[1]) if postgres else ()
    data = Path(tempfile.mkdtemp(prefix="bulkhead-soak-"))
    async with FakeAnthropic(delay=0.05) as fake:
        mesh, addresses = await asyncio.to_thread(
            start_replicated,
            data / "mesh",
            {
                "ANTHROPIC_API_KEY": "sk-ant-fake",
                "ANTHROPIC_BASE_URL": fake.base_url,
                "BULKHEAD_MODEL_PROVIDER": "anthropic",
                "BULKHEAD_ORCHESTRATOR_LEASE_SECONDS": "5",
            },
            up_args,
        )
        tally, rss, kills = Tally(), RssLog(), 0
        start_pids = replica_pids(mesh)
        try:
            async with prepare_tenant(mesh, addresses) as (bh, thread_id):
                load = Workload(bh, tally)
                workers = load.start(thread_id)
                deadline = time.monotonic() + minutes * 60
                next_kill = time.monotonic() + interval
                try:
                    while time.monotonic() < deadline:
                        rss.sample(current_pids(mesh, start_pids))
                        if time.monotonic() >= next_kill:
                            service = KILL_ORDER[kills % len(KILL_ORDER)]
                            label = f"{service}#{kills % 2 + 1}"
                            back = rf"!! {re.escape(label)} is healthy again"
                            seen = matches(mesh, back)
                            os.kill(current_pids(mesh, start_pids)[label], signal.SIGKILL)
                            kills += 1
                            print(
                                f"  {time.strftime('%H:%M:%S')} kill -9 {label}; "
                                f"calls so far {sum(tally.calls.values())}",
                                flush=True,
                            )
                            await wait_for_line(mesh, back, 120, seen=seen)
                            next_kill = time.monotonic() + interval
                        await asyncio.sleep(2)
                finally:
                    await load.finish(workers)
                runs = await load.poll_runs(timeout=120)
                metered = await settled_usage(bh, tally)
        finally:
            rss.sample(current_pids(mesh, start_pids))
            await asyncio.to_thread(mesh.stop)
        billed = len(fake.usage_log)

    calls = sum(tally.calls.values())
    print(f"\n{minutes:g} min, {kills} kills, {calls} calls ({calls / (minutes * 60):.0f}/s)")
    print("calls by method:  " + ", ".join(f"{m} {n}" for m, n in sorted(tally.calls.items())))
    print(
        f"idempotent calls failed: {sum(tally.idempotent_failures.values())}  {dict(tally.idempotent_failures) or ''}"
    )
    print(f"other calls failed (then resent): {sum(tally.other_failures.values())}  {dict(tally.other_failures) or ''}")
    print(f"gave up: {len(tally.gave_up)}  {tally.gave_up[:5] or ''}")
    statuses = Counter(runs.values())
    print(f"runs: {dict(statuses)}")
    print(
        f"model calls metered: {metered}; fake upstream billed: {billed}; "
        f"difference (lost if >0 billed, duplicated if >0 metered): {metered - billed:+d}"
    )
    print("\nRSS per process life (MiB):")
    print(f"  {'replica':<16}{'pid':>8}{'minutes':>9}{'first':>8}{'last':>8}{'drift':>8}")
    for label, pid, mins, first, last, drift in rss.rows():
        print(f"  {label:<16}{pid:>8}{mins:>9.1f}{first:>8.1f}{last:>8.1f}{drift:>+8.1f}")
    long_lives = [r for r in rss.rows() if r[2] >= minutes / 2]
    return {
        "calls": calls,
        "kills": kills,
        "idempotent_failures": sum(tally.idempotent_failures.values()),
        "other_failures": sum(tally.other_failures.values()),
        "gave_up": len(tally.gave_up),
        "runs_not_succeeded": sum(n for s, n in statuses.items() if s != "RUN_STATUS_SUCCEEDED"),
        "metered_minus_billed": metered - billed,
        "max_rss_drift_mb": max((r[5] for r in long_lives), default=None),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the workload runs (default 10)")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between kills (default 30)")
    parser.add_argument("--sqlite", action="store_true", help="SQLite files instead of a throwaway Postgres")
    add_json_option(parser)
    args = parser.parse_args()
    pg = None
    if args.sqlite:
        figures = asyncio.run(soak(args.minutes, args.interval, None))
    else:
        from testkit.postgres import start_postgres

        pg = start_postgres()
        try:
            urls = pg.create_database_sync(f"soak_{uuid.uuid4().hex[:8]}")
            figures = asyncio.run(soak(args.minutes, args.interval, (urls.app_url, urls.owner_url)))
        finally:
            pg.stop()
    write_json(args.json, figures)
    bad = figures["idempotent_failures"] or figures["gave_up"] or figures["runs_not_succeeded"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU per write-ahead attempt record (open + settle + delivered, group-committed) on SQLite.

    .venv/bin/python bench/attempts.py [calls] [concurrency] [--json FILE]

The same calls also run against an in-memory journal table in the same process (the baseline:
the harness, futures and the event loop), so the figure is read next to what a call costs
without any database; the record's own cost is the difference.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench._figures import add_json_option, write_json
from services.inference.attempts import AttemptJournal, context_json
from services.inference.budget import Tokens
from services.inference.server import MIGRATIONS
from services.inference.store import SqlAttempts
from services.inference.usage import UsageEvent
from shared.db import Database
from shared.tenancy import TenantContext


class _MemoryAttempts:
    """The baseline's journal table: numbers rows and keeps nothing."""

    def __init__(self):
        self._next = 0

    async def apply(self, opens, settles, delivered, replica):
        self._next += len(opens)
        return [(self._next - i, 1) for i in range(len(opens))]

    async def recover(self, *, replica, before_ms):
        return []

    async def prune(self, before_ms):
        return 0


async def main(calls: int, concurrency: int, json_to: str | None = None) -> None:
    db = await Database.open(f"sqlite+aiosqlite:///{tempfile.mkdtemp()}/bench.db", migrations=str(MIGRATIONS))
    base, _ = await _measure(AttemptJournal(_MemoryAttempts(), replica="bench"), calls, concurrency)
    cpu, wall = await _measure(AttemptJournal(SqlAttempts(db), replica="bench"), calls, concurrency)
    record = cpu - base
    print(
        f"write-ahead attempt record: {cpu:.3f} ms CPU per call, {record:.3f} ms over the in-memory baseline "
        f"of {base:.3f} ms (x{cpu / base:.1f}) ({calls} calls, concurrency {concurrency}, "
        f"{calls / wall:.0f} calls/s wall; target <= 0.1 ms)"
    )
    write_json(
        json_to,
        {
            "cpu_ms_per_call": cpu,
            "baseline_cpu_ms_per_call": base,
            "record_cpu_ms": record,
            "calls_per_s": calls / wall,
        },
    )
    await db.close()


async def _measure(journal: AttemptJournal, calls: int, concurrency: int) -> tuple[float, float]:
    """CPU ms per call and wall seconds for `calls` records through `journal`."""
    await journal.start()
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            ctx = TenantContext("t_bench", "p", request_id=f"req-{i}")
            a = await journal.open(
                ctx, model="m", reserve=Tokens(10, 50), context=context_json(ctx, trace_id="", occurred_at=time.time())
            )
            event = UsageEvent("t_bench", a.event_id, "p", "", "", "m", Tokens(3, 4), 1, "success", time.time())
            journal.settle(a, event)
            journal.delivered([event])

    await asyncio.gather(*(one(i) for i in range(200)))  # warm-up
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(200, 200 + calls)))
    await journal.flush()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await journal.close()
    return cpu / calls * 1e3, wall


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("calls", type=int, nargs="?", default=5000)
    parser.add_argument("concurrency", type=int, nargs="?", default=64)
    add_json_option(parser)
    cli = parser.parse_args()
    asyncio.run(main(cli.calls, cli.concurrency, cli.json))

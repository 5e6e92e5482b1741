"""CPU per write-ahead attempt record (open + settle + delivered, group-committed) on SQLite.

    .venv/bin/python bench/attempts.py [calls] [concurrency] [--json FILE]
"""
from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench._figures import add_json_option, write_json  # noqa: E402
from services.inference.attempts import AttemptJournal, context_json  # noqa: E402
from services.inference.budget import Tokens  # noqa: E402
from services.inference.server import MIGRATIONS  # noqa: E402
from services.inference.store import SqlAttempts  # noqa: E402
from services.inference.usage import UsageEvent  # noqa: E402
from shared.db import Database  # noqa: E402
from shared.tenancy import TenantContext  # noqa: E402


async def main(calls: int, concurrency: int, json_to: str | None = None) -> None:
    db = await Database.open(f"sqlite+aiosqlite:///{tempfile.mkdtemp()}/bench.db", migrations=str(MIGRATIONS))
    journal = AttemptJournal(SqlAttempts(db), replica="bench")
    await journal.start()
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            ctx = TenantContext("t_bench", "p", request_id=f"req-{i}")
            a = await journal.open(ctx, model="m", reserve=Tokens(10, 50),
                                   context=context_json(ctx, trace_id="", occurred_at=time.time()))
            event = UsageEvent("t_bench", a.event_id, "p", "", "", "m", Tokens(3, 4), 1, "success", time.time())
            journal.settle(a, event)
            journal.delivered([event])

    await asyncio.gather(*(one(i) for i in range(200)))   # warm-up
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(200, 200 + calls)))
    await journal.flush()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(f"write-ahead attempt record: {cpu / calls * 1e3:.3f} ms CPU per call "
          f"({calls} calls, concurrency {concurrency}, {calls / wall:.0f} calls/s wall; target <= 0.1 ms)")
    write_json(json_to, {"cpu_ms_per_call": cpu / calls * 1e3, "calls_per_s": calls / wall})
    await journal.close()
    await db.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("calls", type=int, nargs="?", default=5000)
    parser.add_argument("concurrency", type=int, nargs="?", default=64)
    add_json_option(parser)
    cli = parser.parse_args()
    asyncio.run(main(cli.calls, cli.concurrency, cli.json))

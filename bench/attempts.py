"""CPU per write-ahead attempt record (open + settle + delivered, group-committed) on SQLite.

    .venv/bin/python bench/attempts.py [calls] [concurrency]
"""
from __future__ import annotations

import asyncio
import sys
import tempfile
import time

from services.inference.attempts import AttemptJournal, context_json
from services.inference.budget import Tokens
from services.inference.server import MIGRATIONS
from services.inference.store import SqlAttempts
from services.inference.usage import UsageEvent
from shared.db import Database
from shared.tenancy import TenantContext


async def main(calls: int, concurrency: int) -> None:
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
    await journal.close()
    await db.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000, int(sys.argv[2]) if len(sys.argv) > 2 else 64))

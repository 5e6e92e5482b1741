#!/usr/bin/env python3
"""State service throughput: batched appends and reads (events/s), with and without encryption.

Both modes run in the same process against the same database, interleaved round by round, so
the ratio compares like with like. Measured at the service's domain layer (ThreadLog: validation,
envelope encryption, SQLAlchemy, the tenant-confined session, audit) without gRPC, which is
the strictest place to see the cost of encryption. Backends: SQLite (a temp file) and, when the
PostgreSQL binaries are present, a throwaway Postgres (as the runtime role, with RLS; note the
throwaway cluster runs with fsync off, so commits are cheaper than on a durable server).

    python bench/state.py            # ~1 minute
    python bench/state.py --quick    # a few seconds
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.state.datakeys import LocalDataKeyProvider  # noqa: E402
from services.state.records import Limits, NewEventRecord  # noqa: E402
from services.state.server import MIGRATIONS, make_envelope  # noqa: E402
from services.state.threads import ThreadLog  # noqa: E402
from shared.db import Database  # noqa: E402
from shared.tenancy import TenantContext, tenant_scope  # noqa: E402

LIMITS = Limits(max_events_per_append=1000, max_page_size=1000, replay_batch=1000)
TENANT = TenantContext(tenant_id="t_bench", principal_id="p_bench", scopes=frozenset({"*"}))


async def _append_rate(log: ThreadLog, *, events: int, batch: int, writers: int, payload: bytes) -> float:
    """Events/s appending `events` in batches, from `writers` concurrent writers on their own threads."""
    threads = [(await log.create(thread_id="", run_id="bench", agent_id="", labels={})).thread_id
               for _ in range(writers)]
    per_writer = events // writers
    batch_events = [NewEventRecord("message", payload)] * batch

    async def write(thread_id: str) -> None:
        version = 0
        for _ in range(per_writer // batch):
            _, version = await log.append(thread_id, batch_events, version)

    started = time.perf_counter()
    await asyncio.gather(*(write(t) for t in threads))
    elapsed = time.perf_counter() - started
    log.bench_threads = threads  # read back by _read_rate
    return per_writer // batch * batch * writers / elapsed


async def _read_rate(log: ThreadLog, *, page_size: int) -> tuple[float, float]:
    """(ReadEvents events/s, Replay events/s) over the threads the last append round wrote."""
    started, count = time.perf_counter(), 0
    for thread_id in log.bench_threads:
        token = ""
        while True:
            page = await log.read(thread_id, after_version=0, page_size=page_size, page_token=token)
            count += len(page.items)
            token = page.next_page_token
            if not token:
                break
    read = count / (time.perf_counter() - started)
    started, count = time.perf_counter(), 0
    for thread_id in log.bench_threads:
        async for _ in await log.replay(thread_id, up_to_version=0, from_snapshot=False):
            count += 1
    return read, count / (time.perf_counter() - started)


async def bench_backend(name: str, db: Database, args) -> dict[str, dict[str, list[float]]]:
    """Interleaved rounds of both modes on one database; every figure of every round."""
    logs = {
        "plaintext": ThreadLog(db, make_envelope(db, None), LIMITS),
        "encrypted": ThreadLog(db, make_envelope(db, LocalDataKeyProvider(os.urandom(32))), LIMITS),
    }
    payload = os.urandom(args.payload)
    results: dict[str, dict[str, list[float]]] = {m: {"append": [], "read": [], "replay": []} for m in logs}
    with tenant_scope(TENANT):
        # Warm-up: connections, statement caches, the tenant's data key.
        for log in logs.values():
            await _append_rate(log, events=args.batch, batch=args.batch, writers=1, payload=payload)
        for _ in range(args.rounds):
            for mode, log in logs.items():
                results[mode]["append"].append(await _append_rate(
                    log, events=args.events, batch=args.batch, writers=args.writers, payload=payload))
                read, replay = await _read_rate(log, page_size=1000)
                results[mode]["read"].append(read)
                results[mode]["replay"].append(replay)
    return results


def report(name: str, results: dict[str, dict[str, list[float]]], args) -> None:
    """Median events/s per mode and the cost of encryption (plaintext rate / encrypted rate)."""
    print(f"\n{name}: {args.events} events/round in batches of {args.batch}, {args.writers} writers, "
          f"{args.payload}-byte payloads, {args.rounds} rounds (median)")
    print(f"  {'operation':<10}{'plaintext ev/s':>16}{'encrypted ev/s':>16}{'cost ×':>9}")
    for op in ("append", "read", "replay"):
        plain = statistics.median(results["plaintext"][op])
        enc = statistics.median(results["encrypted"][op])
        print(f"  {op:<10}{plain:>16,.0f}{enc:>16,.0f}{plain / enc:>9.2f}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few seconds: smaller rounds, SQLite only")
    parser.add_argument("--events", type=int, default=None, help="events appended per mode per round")
    parser.add_argument("--batch", type=int, default=500, help="events per AppendEvents")
    parser.add_argument("--writers", type=int, default=4, help="concurrent writers (each on its own thread)")
    parser.add_argument("--payload", type=int, default=256, help="payload bytes per event")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    args.events = args.events or (4_000 if args.quick else 20_000)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.events -= args.events % (args.batch * args.writers)

    with tempfile.TemporaryDirectory() as tmp:
        db = await Database.open(f"sqlite+aiosqlite:///{tmp}/state.db", migrations=str(MIGRATIONS))
        try:
            report("SQLite", await bench_backend("sqlite", db, args), args)
        finally:
            await db.close()

    if args.quick or args.no_postgres:
        return
    from shared.testing.postgres import start_postgres
    from shared.testing.procs import ServerStartError

    try:
        server = start_postgres()
    except ServerStartError as exc:
        print(f"\nPostgreSQL: not measured ({exc})")
        return
    try:
        urls = await server.create_database("state_bench")
        db = await Database.open(urls.app_url, migrations=str(MIGRATIONS), owner_url=urls.owner_url,
                                 pool_size=args.writers + 2)
        try:
            report("PostgreSQL (runtime role, RLS on)", await bench_backend("postgres", db, args), args)
        finally:
            await db.close()
    finally:
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())

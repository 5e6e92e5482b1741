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
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._figures import add_json_option, write_json
from services.state.datakeys import LocalDataKeyProvider
from services.state.records import Limits, NewEventRecord
from services.state.server import MIGRATIONS, make_envelope
from services.state.threads import ThreadLog
from shared.db import Database
from shared.tenancy import TenantContext, tenant_scope

LIMITS = Limits(max_events_per_append=1000, max_page_size=1000, replay_batch=1000)
TENANT = TenantContext(tenant_id="t_bench", principal_id="p_bench", scopes=frozenset({"*"}))


class Timer:
    """Wall-clock and process CPU time of a block (CPU includes the SQLite worker thread)."""

    def __enter__(self) -> Self:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


async def _append(log: ThreadLog, *, events: int, batch: int, writers: int, payload: bytes) -> tuple[Timer, list]:
    """Append `events` in batches from `writers` concurrent writers, each on a thread of its own."""
    threads = [
        (await log.create(thread_id="", run_id="bench", agent_id="", labels={})).thread_id for _ in range(writers)
    ]
    batch_events = [NewEventRecord("message", payload)] * batch

    async def write(thread_id: str) -> None:
        version = 0
        for _ in range(events // writers // batch):
            _, version = await log.append(thread_id, batch_events, version)

    with Timer() as t:
        await asyncio.gather(*(write(tid) for tid in threads))
    return t, threads


async def _read(log: ThreadLog, threads: list[str], *, page_size: int) -> Timer:
    """Read every event of `threads` with ReadEvents pages."""
    with Timer() as t:
        for thread_id in threads:
            token = ""
            while True:
                page, _ = await log.read(thread_id, after_version=0, page_size=page_size, page_token=token)
                token = page.next_page_token
                if not token:
                    break
    return t


async def _replay(log: ThreadLog, threads: list[str]) -> Timer:
    """Stream every event of `threads` with Replay."""
    with Timer() as t:
        for thread_id in threads:
            async for _ in await log.replay(thread_id, up_to_version=0, from_snapshot=False):
                pass
    return t


async def bench_backend(db: Database, args) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Interleaved rounds of both modes on one database: (events/s, CPU µs/event) per op and round."""
    logs = {
        "plaintext": ThreadLog(db, make_envelope(db, None), LIMITS),
        "encrypted": ThreadLog(db, make_envelope(db, LocalDataKeyProvider(os.urandom(32))), LIMITS),
    }
    payload = os.urandom(args.payload)
    results: dict = {m: {"append": [], "read": [], "replay": []} for m in logs}
    n = args.events
    with tenant_scope(TENANT):
        # Warm-up: connections, statement caches, the tenant's data key.
        for log in logs.values():
            await _append(
                log, events=args.batch * args.writers, batch=args.batch, writers=args.writers, payload=payload
            )
        for round_no in range(args.rounds):
            # ABBA order: a drift in machine load does not favour either mode.
            order = list(logs) if round_no % 2 == 0 else list(reversed(logs))
            for mode in order:
                log = logs[mode]
                t, threads = await _append(log, events=n, batch=args.batch, writers=args.writers, payload=payload)
                results[mode]["append"].append((n / t.wall, t.cpu / n * 1e6))
                t = await _read(log, threads, page_size=1000)
                results[mode]["read"].append((n / t.wall, t.cpu / n * 1e6))
                t = await _replay(log, threads)
                results[mode]["replay"].append((n / t.wall, t.cpu / n * 1e6))
    return results


async def bench_grpc(db: Database, args) -> tuple[float, float]:
    """End to end over gRPC with the production interceptors, encrypted: (append ev/s, ReadEvents ev/s)."""
    import grpc

    from bulkhead.state.v1 import state_pb2, state_pb2_grpc
    from services.state.server import serve_state
    from testkit.tokens import TestTokens

    tokens = TestTokens()
    envelope = make_envelope(db, LocalDataKeyProvider(os.urandom(32)))
    running = await serve_state(db=db, envelope=envelope, verifier=tokens.verifier, limits=LIMITS)
    channel = grpc.aio.insecure_channel(running.address, options=[("grpc.max_receive_message_length", 64 << 20)])
    stub = state_pb2_grpc.StateServiceStub(channel)
    md = tokens.metadata("t_benchgrpc")
    payload = os.urandom(args.payload)
    events = [state_pb2.NewEvent(type="message", payload=payload)] * args.batch
    try:
        threads = [
            (await stub.CreateThread(state_pb2.CreateThreadRequest(), metadata=md)).thread.thread_id
            for _ in range(args.writers)
        ]

        async def write(thread_id: str) -> None:
            for version in range(0, args.events // args.writers, args.batch):
                await stub.AppendEvents(
                    state_pb2.AppendEventsRequest(thread_id=thread_id, expected_version=version, events=events),
                    metadata=md,
                )

        await write(threads[0])  # warm-up (and the tenant's data key)
        threads = [
            *threads[1:],
            (await stub.CreateThread(state_pb2.CreateThreadRequest(), metadata=md)).thread.thread_id,
        ]
        with Timer() as t:
            await asyncio.gather(*(write(tid) for tid in threads))
        append = args.events / t.wall
        with Timer() as t:
            for thread_id in threads:
                token = ""
                while True:
                    page = await stub.ReadEvents(
                        state_pb2.ReadEventsRequest(thread_id=thread_id, page_size=1000, page_token=token), metadata=md
                    )
                    token = page.next_page_token
                    if not token:
                        break
        return append, args.events / t.wall
    finally:
        await channel.close()
        await running.stop(0)


def report(name: str, results: dict, args) -> dict[str, float]:
    """Best round per mode (other load on the machine only ever slows a round down, as in timeit),
    and the cost of encryption as plaintext/encrypted throughput and CPU ratios; returns the cost per op."""
    print(
        f"\n{name}: {args.events:,} events per mode per round, batches of {args.batch}, "
        f"{args.writers} writers, {args.payload}-byte payloads, {args.rounds} interleaved rounds (best of)"
    )
    print(
        f"  {'op':<8}{'plain ev/s':>12}{'enc ev/s':>12}{'cost ×':>8}   "
        f"{'plain CPU µs/ev':>16}{'enc CPU µs/ev':>15}{'CPU ×':>8}"
    )
    costs = {}
    for op in ("append", "read", "replay"):
        plain_rate = max(r for r, _ in results["plaintext"][op])
        enc_rate = max(r for r, _ in results["encrypted"][op])
        plain_cpu = min(c for _, c in results["plaintext"][op])
        enc_cpu = min(c for _, c in results["encrypted"][op])
        costs[op] = plain_rate / enc_rate
        print(
            f"  {op:<8}{plain_rate:>12,.0f}{enc_rate:>12,.0f}{plain_rate / enc_rate:>8.2f}   "
            f"{plain_cpu:>16.1f}{enc_cpu:>15.1f}{enc_cpu / plain_cpu:>8.2f}"
        )
    print(
        "  cost × = plaintext events/s ÷ encrypted events/s (target ≤ 1.25); "
        "CPU = this process only (on Postgres the server's CPU is not included)"
    )
    return costs


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few seconds: smaller rounds, SQLite only")
    parser.add_argument("--events", type=int, default=None, help="events appended per mode per round")
    parser.add_argument("--batch", type=int, default=500, help="events per AppendEvents")
    parser.add_argument("--writers", type=int, default=4, help="concurrent writers (each on its own thread)")
    parser.add_argument("--payload", type=int, default=256, help="payload bytes per event")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--no-postgres", action="store_true")
    add_json_option(parser)
    args = parser.parse_args()
    args.events = args.events or (2_000 if args.quick else 6_000)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.events -= args.events % (args.batch * args.writers)

    with tempfile.TemporaryDirectory() as tmp:
        db = await Database.open(f"sqlite+aiosqlite:///{tmp}/state.db", migrations=str(MIGRATIONS))
        try:
            costs = report("SQLite", await bench_backend(db, args), args)
        finally:
            await db.close()
    figures = {f"sqlite_{op}_encryption_cost_ratio": cost for op, cost in costs.items()}
    try:
        if not (args.quick or args.no_postgres):
            figures |= await _postgres(args)
    finally:
        write_json(args.json, figures)


async def _postgres(args) -> dict[str, float]:
    """The same on a throwaway Postgres, then appends and reads over gRPC; {} without Postgres binaries."""
    from testkit.postgres import start_postgres
    from testkit.procs import ServerStartError

    try:
        server = start_postgres()
    except ServerStartError as exc:
        print(f"\nPostgreSQL: not measured ({exc})")
        return {}
    try:
        urls = await server.create_database("state_bench")
        db = await Database.open(
            urls.app_url, migrations=str(MIGRATIONS), owner_url=urls.owner_url, pool_size=args.writers + 2
        )
        try:
            costs = report("PostgreSQL (runtime role, RLS on)", await bench_backend(db, args), args)
            append, read = await bench_grpc(db, args)
            print(
                f"\nPostgreSQL over gRPC (production interceptors, encrypted, client in the same process): "
                f"append {append:,.0f} ev/s, ReadEvents {read:,.0f} ev/s (target: batched appends ≥ 5,000)"
            )
            return {f"postgres_{op}_encryption_cost_ratio": cost for op, cost in costs.items()} | {
                "postgres_grpc_append_events_per_s": append,
                "postgres_grpc_read_events_per_s": read,
            }
        finally:
            await db.close()
    finally:
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())

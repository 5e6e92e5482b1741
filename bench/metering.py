#!/usr/bin/env python3
"""Metering throughput on Postgres: RecordUsage ingest (events/s) for batches of 1, 100 and 1000,
and ReserveBudget+CommitBudget pairs/s, all in one run. On Postgres each Reserve and each Commit is one
round trip (migration 0008's functions), and those of one tenant in flight together share one (group commit):
the "1 tenant" line shows the most sharing, "8 tenants" little.

The metering server runs in a child process (production interceptors, runtime role with RLS, a
throwaway Postgres from testkit, uvloop and a frozen start-up heap as main() runs it), and the load in
another, so the two do not share a GIL (on uvloop too: the callers it stands for are services). The RPC
figures are measured on one server process and again on
`--workers` processes sharing one port (SO_REUSEPORT, as BULKHEAD_METERING_WORKERS runs them), with the
same load. The load builds its RecordUsage requests before timing starts (every key unique, so each event is
really inserted). Reservations use a priced model, so they hold tokens and money.
Baselines measured in the same run: a raw asyncpg multi-row insert of the same events (the
database's own ceiling for ingest) and a health-check RPC (the gRPC floor for a round trip: no
token, no database). Reserve+Commit is two RPCs, so that floor caps pairs/s at floor / 2; both are
driven by `--loaders` load processes (2 by default: one Python client process cannot saturate the
server), and each line shows the server's CPU per RPC and how busy the machine's cores were.
`--quick` runs about a second per figure for a smoke test; `--profile FILE` writes a cProfile of
the server process; `--pairs-only` and `--ingest-only` run half of it.
Targets (bench/_targets.py, issue 16): >= 50,000 events/s at batch 1000; >= 1,500 pairs/s, this machine's
two-RPC ceiling (the 2,000 of issue 5 was above it).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._figures import add_json_option, write_json
from bench._targets import limit_of

MODEL = "claude-bench"
T_START = 1_780_000_000_000_000

PAIRS_FIGURE, INGEST_FIGURE = "metering.reserve_commit_pairs_per_s", "metering.ingest_batch1000_events_per_s"
"""The figures this bench writes that issue 16 sets targets on (their bounds: bench/_targets.py)."""


def _serve(
    port_queue, url: str, owner_url: str, key_bytes: bytes, kid: str, profile_to: str | None, address: str, loop: str
) -> None:
    """One metering server process, run as `python -m services.metering` runs one (its event loop, its heap
    frozen after start-up); address "host:port" with a port shared with other workers (SO_REUSEPORT), or port 0."""

    async def run() -> None:
        import signal

        from services.metering.server import MIGRATIONS, serve_metering
        from shared.db import Database
        from shared.process import freeze_startup_heap
        from shared.tokens import SigningKey, StaticKeySource, TokenVerifier

        key = SigningKey.from_private_bytes(kid, key_bytes)
        db = await Database.open(url, migrations=str(MIGRATIONS), owner_url=owner_url, pool_size=20, max_overflow=0)
        service = await serve_metering(
            db=db,
            verifier=TokenVerifier(StaticKeySource({kid: key.public_key})),
            address=address,
            reuse_port=not address.endswith(":0"),
        )
        freeze_startup_heap()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        profiler = None
        if profile_to:  # --profile: where the server's CPU goes, written when the bench stops it
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        port_queue.put(service.running.port)
        await stop.wait()
        if profiler is not None and profile_to:
            profiler.disable()
            profiler.dump_stats(profile_to)

    if loop == "asyncio":
        asyncio.run(run())
    else:
        from shared.process import run_loop

        run_loop(run)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def _load(
    kind: str, address: str, metadata: list, seconds: float, concurrency: int, batch: int, out, warmed, go, loop: str
) -> None:
    """Run one workload in this (child) process and report (operations, events, elapsed).

    Warms up, then signals `warmed` and waits for `go`, so several load processes run together. The load runs on
    the servers' event loop: the callers it stands for (the inference proxy) are services too.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from bulkhead.metering.v1 import metering_pb2 as pb
    from bulkhead.metering.v1 import metering_pb2_grpc

    async def run() -> tuple[int, int, float]:
        channels = [grpc.aio.insecure_channel(address) for _ in range(4)]
        stubs = [metering_pb2_grpc.MeteringServiceStub(c) for c in channels]
        health = health_pb2_grpc.HealthStub(channels[0])
        counter = itertools.count()
        prefix = uuid.uuid4().hex[:8]

        def events(n: int) -> pb.RecordUsageRequest:
            base = next(counter) * n
            return pb.RecordUsageRequest(
                events=[
                    pb.UsageEvent(
                        idempotency_key=f"{prefix}-{base + i}",
                        model=MODEL,
                        agent_id="agent",
                        run_id="run",
                        tokens=pb.TokenCounts(input_tokens=1000, output_tokens=200),
                        latency_ms=900,
                        occur_time={"seconds": T_START // 1_000_000 + (base + i) % 86400},
                    )
                    for i in range(n)
                ]
            )

        # Ingest requests are built before the clock starts: building protos in Python is the load
        # generator's cost, not the server's, and would otherwise cap the figure on this machine.
        ready: list = []
        if kind == "ingest":
            ready = [events(batch) for _ in range(int(seconds * min(3000, 60_000 // batch)) + 16)]
        ready_iter = iter(ready)

        async def one(worker: int) -> int:
            stub, md = stubs[worker % len(stubs)], metadata[worker % len(metadata)]
            if kind == "ingest":
                resp = await stub.RecordUsage(next(ready_iter, None) or events(batch), metadata=md)
                return resp.recorded_count
            if kind == "pairs":
                res = await stub.ReserveBudget(
                    pb.ReserveBudgetRequest(model=MODEL, prompt_tokens=100, max_output_tokens=100), metadata=md
                )
                await stub.CommitBudget(
                    pb.CommitBudgetRequest(
                        reservation_id=res.reservation_id, usage=pb.TokenCounts(input_tokens=100, output_tokens=50)
                    ),
                    metadata=md,
                )
                return 1
            if kind == "price":
                await stub.SetPrice(
                    pb.SetPriceRequest(
                        price=pb.Price(
                            model=MODEL,
                            effective_time={"seconds": 1},
                            input_micros_per_mtok=3_000_000,
                            output_micros_per_mtok=15_000_000,
                            cache_write_micros_per_mtok=3_750_000,
                            cache_read_micros_per_mtok=300_000,
                        )
                    ),
                    metadata=md,
                )
                return 1
            await health.Check(health_pb2.HealthCheckRequest())  # type: ignore[attr-defined]  # stub lists no RPCs
            return 1

        for w in range(min(concurrency, 8)):  # warm up connections, token cache, statement cache
            await one(w)
        if kind == "price":
            return 1, 1, 0.0
        warmed.release()
        await asyncio.to_thread(go.wait)
        done = [0, 0]
        stop_at = time.perf_counter() + seconds

        async def worker(w: int) -> None:
            while time.perf_counter() < stop_at:
                events = await one(w)  # not `done[1] += await ...`: that reads done[1] before awaiting
                done[1] += events
                done[0] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - started
        for c in channels:
            await c.close()
        return done[0], done[1], elapsed

    if loop == "asyncio":
        out.put(asyncio.run(run()))
    else:
        from shared.process import run_loop

        out.put(run_loop(run))


@dataclass
class Figure:
    """One workload's result, summed over its load processes."""

    ops: int
    """Calls (or pairs) completed."""
    events: int
    """Usage events recorded (ingest)."""
    rate: float
    """ops per second."""
    server_cpu_s: float
    """CPU the server process used meanwhile."""
    machine_busy: float
    """Share of all cores' time that was busy meanwhile (0..1)."""
    db_cpu_s: float | None = None
    """CPU the bench database's Postgres backends used meanwhile (None: not measured)."""


def _run_load(
    ctx,
    server_pids: list[int],
    kind: str,
    address: str,
    metadata: list,
    seconds: float,
    concurrency: int,
    batch: int,
    *,
    loaders: int = 1,
    db_cpu: Callable[[], dict[int, float]] | None = None,
    loop: str = "uvloop",
) -> Figure:
    """Run a workload from `loaders` processes at once (concurrency split between them); server_pids: the
    processes serving it (their CPU is summed)."""
    q, warmed, go = ctx.Queue(), ctx.Semaphore(0), ctx.Event()
    procs = [
        ctx.Process(
            target=_load,
            args=(kind, address, metadata, seconds, max(1, concurrency // loaders), batch, q, warmed, go, loop),
            daemon=True,
        )
        for _ in range(loaders)
    ]
    for p in procs:
        p.start()
    if kind != "price":
        for _ in procs:
            if not warmed.acquire(timeout=300):
                raise RuntimeError(f"a {kind} load process did not start")
    db0 = db_cpu() if db_cpu else None
    cpu0, (busy0, total0) = sum(map(_cpu_seconds, server_pids)), _machine_jiffies()
    go.set()
    results = [q.get(timeout=300) for _ in procs]
    cpu1, (busy1, total1) = sum(map(_cpu_seconds, server_pids)), _machine_jiffies()
    db1 = db_cpu() if db_cpu else None
    for p in procs:
        p.join()
    ops = sum(r[0] for r in results)
    rate = sum(r[0] / r[2] for r in results if r[2])
    db_s = sum(v - db0.get(pid, 0.0) for pid, v in db1.items()) if db0 is not None and db1 is not None else None
    return Figure(ops, sum(r[1] for r in results), rate, cpu1 - cpu0, (busy1 - busy0) / max(1, total1 - total0), db_s)


def _cpu_note(fig: Figure, rpcs_per_op: int = 1) -> str:
    per_rpc_ms = 1000 * fig.server_cpu_s / max(1, fig.ops * rpcs_per_op)
    db = "" if fig.db_cpu_s is None else f", postgres {1000 * fig.db_cpu_s / max(1, fig.ops * rpcs_per_op):.2f}"
    return f"server {per_rpc_ms:.2f}{db} ms CPU/RPC, cores {100 * fig.machine_busy:.0f}% busy"


def _backends_cpu(admin_dsn: str, database: str) -> dict[int, float]:
    """CPU seconds so far of each Postgres backend connected to `database` (empty when not on this machine)."""
    import asyncpg

    async def pids() -> list[int]:
        conn = await asyncpg.connect(admin_dsn)
        try:
            rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", database)
        finally:
            await conn.close()
        return [r[0] for r in rows]

    found = {}
    for pid in asyncio.run(pids()):
        try:
            found[pid] = _cpu_seconds(pid)
        except OSError:  # gone, or in a container: not measured
            continue
    return found


async def _raw_insert_baseline(dsn: str, tenant: str, seconds: float, batch: int = 1000) -> float:
    """Events/s of the same unnest insert straight through asyncpg (no gRPC, no ORM)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    sql = """INSERT INTO metering_usage_events (tenant_id, idempotency_key, principal_id, agent_id, run_id, trace_id,
        model, input_tokens, output_tokens, cache_write_tokens, cache_read_tokens, latency_ms, outcome, occurred_us,
        hour, day, recorded_us)
        SELECT $1, k, 'p', 'agent', 'run', '', $2, 1000, 200, 0, 0, 900, 1, $3, $3 / 3600000000, $3 / 86400000000, $3
        FROM unnest($4::text[]) AS k ON CONFLICT DO NOTHING"""
    n, prefix, started = 0, uuid.uuid4().hex[:8], time.perf_counter()
    stop_at = started + seconds
    while time.perf_counter() < stop_at:
        keys = [f"raw-{prefix}-{n + i}" for i in range(batch)]
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.tenant_id', $1, true)", tenant)
            await conn.execute(sql, tenant, MODEL, T_START, keys)
        n += batch
    elapsed = time.perf_counter() - started
    await conn.close()
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="per figure")
    parser.add_argument("--quick", action="store_true", help="about a second per figure (smoke test)")
    parser.add_argument("--loaders", type=int, default=2, help="load processes for the RPC floor and the pairs")
    parser.add_argument("--profile", metavar="FILE", help="write a cProfile of the one-process server to FILE")
    parser.add_argument(
        "--workers", type=int, default=2, help="server processes sharing a port for the second set of figures (1: none)"
    )
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="the servers' and the load's event loop (main() runs uvloop)",
    )
    parser.add_argument("--pairs-only", action="store_true", help="only the RPC floor and Reserve+Commit")
    parser.add_argument("--ingest-only", action="store_true", help="only the RPC floor, the raw insert and RecordUsage")
    add_json_option(parser)
    args = parser.parse_args()
    seconds = 1.0 if args.quick else args.seconds

    from sqlalchemy import make_url

    from shared.tokens import SigningKey, TokenIssuer
    from testkit.postgres import start_postgres

    load_before = f"{os.getloadavg()[0]:.1f}"
    pg = start_postgres()
    try:
        urls = asyncio.run(pg.create_database("metering_bench"))
        key = SigningKey.generate()
        issuer = TokenIssuer(key)

        def md(tenant: str, scopes) -> list:
            token, _ = issuer.issue(tenant_id=tenant, principal_id="p_bench", scopes=frozenset(scopes), ttl=3600)
            return [("authorization", f"Bearer {token}"), ("x-tenant-id", tenant)]

        ctx = multiprocessing.get_context("spawn")
        q = ctx.Queue()
        servers: list = []

        def serve(address: str, profile_to: str | None = None) -> tuple[int, int]:
            """Start one server process on address: (its pid, its port) once it serves."""
            args_ = (q, urls.app_url, urls.owner_url, key.private_bytes(), key.kid, profile_to, address, args.loop)
            servers.append(ctx.Process(target=_serve, args=args_, daemon=True))
            servers[-1].start()
            port = q.get(timeout=120)
            if servers[-1].pid is None:
                raise RuntimeError("the metering server process did not start")
            return servers[-1].pid, port

        from shared.process import hold_port

        rows = []
        holder = None
        try:
            # One process on its own port, and `--workers` processes sharing another (SO_REUSEPORT), each
            # started once the one before serves (the first migrated the database). Only the one under load works.
            pid, port = serve("127.0.0.1:0", args.profile and str(Path(args.profile).resolve()))
            configs = [("1 process", [pid], f"127.0.0.1:{port}")]
            if args.workers > 1:
                shared, holder = hold_port("127.0.0.1:0")
                configs.append((f"{args.workers} workers", [serve(shared)[0] for _ in range(args.workers)], shared))
            loaders = args.loaders
            database = make_url(urls.app_url).database or "metering_bench"

            def db_cpu() -> dict[int, float]:
                return _backends_cpu(pg.admin_dsn, database)

            pids, address = configs[0][1], configs[0][2]
            # A priced model, as in production: reservations then hold money as well as tokens.
            _run_load(ctx, pids, "price", address, [md("t_platform", ["platform.operator"])], 0, 1, 0, loop=args.loop)
            floors: dict[str, Figure] = {}
            for config, config_pids, config_address in configs:
                floors[config] = fig = _run_load(
                    ctx, config_pids, "health", config_address, [()], seconds, 32, 0, loaders=loaders, loop=args.loop
                )
                rows.append(
                    (
                        f"health Check RPC, {config}, {loaders} loaders (gRPC floor)",
                        f"{fig.rate:,.0f} calls/s",
                        _cpu_note(fig),
                    )
                )
            floor = floors["1 process"]
            ingest: dict[int, float] = {}
            ingest_cpu: dict[int, Figure] = {}
            raw = 0.0 if args.pairs_only else asyncio.run(_raw_insert_baseline(urls.app_dsn, "t_benchraw", seconds))
            if raw:
                rows.append(("raw asyncpg insert, batch 1000 (baseline)", f"{raw:,.0f} events/s", ""))
            for batch, conc in () if args.pairs_only else ((1, 32), (100, 16), (1000, 4)):
                fig = _run_load(
                    ctx,
                    pids,
                    "ingest",
                    address,
                    [md("t_benchingest", ["metering.usage.write"])],
                    seconds,
                    conc,
                    batch,
                    loop=args.loop,
                )
                ingest[batch] = fig.events / fig.ops * fig.rate if fig.ops else 0.0
                ingest_cpu[batch] = fig
            for batch, rate in ingest.items():
                note = f"{rate / raw:.2f}x raw insert" if batch == 1000 else f"{rate / floor.rate:.2f}x health RPC/s"
                fig = ingest_cpu[batch]
                per_event_us = 1e6 * fig.server_cpu_s / max(1, fig.events)
                note += f"; server {per_event_us:.1f} us CPU/event, cores {100 * fig.machine_busy:.0f}% busy"
                rows.append((f"RecordUsage batch {batch}", f"{rate:,.0f} events/s", note))
            pairs: dict[str, float] = {}
            for config, config_pids, config_address in () if args.ingest_only else configs:
                for name, tenants in (
                    ("8 tenants", [md(f"t_benchpairs{i}", ["metering.budget.write"]) for i in range(8)]),
                    ("1 tenant (one hot counter row)", [md("t_benchhot", ["metering.budget.write"])]),
                ):
                    fig = _run_load(
                        ctx,
                        config_pids,
                        "pairs",
                        config_address,
                        tenants,
                        seconds,
                        32,
                        0,
                        loaders=loaders,
                        db_cpu=db_cpu,
                        loop=args.loop,
                    )
                    pairs[f"{config}, {name}"] = fig.rate
                    cap = f"{fig.rate / max(1.0, floors[config].rate / 2):.2f}x its floor's cap; "  # the same-run ratio
                    rows.append(
                        (f"Reserve+Commit, {config}, {name}", f"{fig.rate:,.0f} pairs/s", cap + _cpu_note(fig, 2))
                    )
            for config, _, _ in configs:
                rows.append(
                    (
                        f"Reserve+Commit cap set by the gRPC floor, {config}",
                        f"{floors[config].rate / 2:,.0f} pairs/s",
                        "2 RPCs a pair: floor / 2",
                    )
                )
        finally:
            for server in servers:
                server.terminate()
            for server in servers:
                server.join(timeout=60)
            if holder is not None:
                holder.close()
        print(
            f"load average before/after: {load_before} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
            "(other work on the machine depresses every figure alike; compare the ratios)"
        )
        width = max(len(r[0]) for r in rows)
        for name, figure, note in rows:
            print(f"{name:<{width}}  {figure:>18}  {note}")
        ingest_goal, pairs_goal = limit_of(INGEST_FIGURE), limit_of(PAIRS_FIGURE)
        verdict = "not measured" if not ingest else "met" if ingest[1000] >= ingest_goal else "NOT met"
        best = max(pairs.values(), default=0.0)
        pair_verdict = (
            "not measured"
            if not pairs
            else "met"
            if best >= pairs_goal
            else (
                "NOT met"
                + (
                    " (above the gRPC floor's cap on this machine)"
                    if max(f.rate for f in floors.values()) / 2 < pairs_goal
                    else ""
                )
            )
        )
        print(
            f"targets: RecordUsage batch 1000 >= {ingest_goal:,.0f} events/s -> {verdict}; "
            f"Reserve+Commit >= {pairs_goal:,.0f} pairs/s -> {pair_verdict}"
        )
        write_json(
            args.json,
            {
                "reserve_commit_pairs_per_s": best,
                "reserve_commit_pairs_per_s_1_process": max(
                    (rate for name, rate in pairs.items() if name.startswith("1 process")), default=0.0
                ),
                "reserve_commit_pairs_per_s_workers": max(
                    (rate for name, rate in pairs.items() if not name.startswith("1 process")), default=None
                ),
                "grpc_floor_calls_per_s": floor.rate,
                "grpc_floor_calls_per_s_workers": max(
                    (f.rate for n, f in floors.items() if n != "1 process"), default=None
                ),
                "ingest_batch1000_events_per_s": ingest.get(1000),
                "raw_insert_events_per_s": raw or None,
            },
        )
    finally:
        pg.stop()


if __name__ == "__main__":
    main()

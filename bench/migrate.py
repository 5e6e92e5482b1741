#!/usr/bin/env python3
"""Live tier migration: rows moved per second and the write pause a live writer sees.

One tenant holds 100k state events (encrypted, in 100 threads) and 10k usage events; it moves
pooled -> bridge -> silo -> pooled on a throwaway Postgres (runtime role under RLS; the throwaway
cluster runs with fsync off, so commits are cheaper than on a durable server). Each hop is what
identity's MigrateTenant asks of each service, called in-process on shared.lifecycle.TenantLifecycle
(no gRPC): copy (the tenant's requests pause), verify (rows + checksums equal), switch, release.
Meanwhile a writer appends one state event at a time as that tenant, retrying the TENANT_MIGRATING
refusals as a client would; every write's latency (retries included) is recorded.

    python bench/migrate.py            # 100k state events + 10k usage events
    python bench/migrate.py --quick    # 10k + 1k
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._figures import add_json_option, write_json
from services.metering import store as metering_store
from services.metering.server import MIGRATIONS as METERING_MIGRATIONS
from services.metering.store import MeteringBase
from services.metering.usage import UsageRecord
from services.state.datakeys import LocalDataKeyProvider
from services.state.records import Limits, NewEventRecord
from services.state.server import MIGRATIONS as STATE_MIGRATIONS
from services.state.server import make_envelope
from services.state.store import StateBase
from services.state.threads import ThreadLog
from shared.db import Database
from shared.errors import Unavailable
from shared.lifecycle import TenantLifecycle
from shared.tenancy import TenantContext, tenant_scope
from shared.tiers import Tier

TENANT = "t_benchmove"
CTX = TenantContext(tenant_id=TENANT, principal_id="p_bench", scopes=frozenset({"*"}), tier="pooled")
LIMITS = Limits(max_events_per_append=1000, max_page_size=1000, replay_batch=1000)
HOPS = (("pooled", "bridge"), ("bridge", "silo"), ("silo", "pooled"))


async def fill(log: ThreadLog, metering: Database, state_events: int, usage_events: int) -> None:
    with tenant_scope(CTX):
        payload = secrets.token_bytes(200)
        for _ in range(100):
            thread = (await log.create(thread_id="", run_id="bench", agent_id="", labels={})).thread_id
            version = 0
            for _ in range(state_events // 100 // 1000 or 1):
                n = min(1000, state_events // 100)
                _, version = await log.append(thread, [NewEventRecord("message", payload)] * n, version)
        now = int(time.time() * 1_000_000)
        for start in range(0, usage_events, 1000):
            records = [
                UsageRecord(idempotency_key=f"k{i}", model="claude-bench", occurred_us=now - i * 1000)
                for i in range(start, min(start + 1000, usage_events))
            ]
            async with metering.raw(write=True) as tx:
                await metering_store.insert_usage(tx, TENANT, records, now, default_principal="p_bench")


class Writer:
    """One append at a time; a TENANT_MIGRATING refusal is retried after its retry delay."""

    def __init__(self, log: ThreadLog) -> None:
        self.log = log
        self.latencies: list[float] = []
        self.pauses: list[float] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        with tenant_scope(CTX):
            thread = (await self.log.create(thread_id="", run_id="live", agent_id="", labels={})).thread_id
            while not self.stop.is_set():
                started, refused = time.perf_counter(), False
                while True:
                    try:
                        await self.log.append(thread, [NewEventRecord("message", b"live")], None)
                        break
                    except Unavailable as exc:
                        if exc.reason != "TENANT_MIGRATING":
                            raise
                        refused = True
                        await asyncio.sleep(exc.retry_after or 0.05)
                took = time.perf_counter() - started
                self.latencies.append(took)
                if refused:
                    self.pauses.append(took)
                await asyncio.sleep(0.002)


async def hop(lifecycles: list[TenantLifecycle], source: Tier, target: Tier) -> tuple[int, float]:
    """Copy, verify, switch and release every service; (rows moved, seconds from first copy to last switch)."""
    started = time.perf_counter()
    rows = 0
    for lc in lifecycles:
        done = await lc.copy(TENANT, source, target, pause_seconds=60)
        left, right = await lc.verify(TENANT, source, target)
        assert [(c.rows, c.checksum) for c in left] == [(c.rows, c.checksum) for c in right], lc.service
        rows += sum(c.rows for c in done.copied)
    for lc in lifecycles:
        lc.switch(TENANT, target)
    paused = time.perf_counter() - started
    for lc in lifecycles:
        await lc.release(TENANT, source, target)
    return rows, paused


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(pg, state_events: int, usage_events: int, figures: dict) -> list[tuple[str, str, str]]:
    state_urls = await pg.create_database("migrate_bench_state")
    metering_urls = await pg.create_database("migrate_bench_metering")
    state = await Database.open(state_urls.app_url, migrations=str(STATE_MIGRATIONS), owner_url=state_urls.owner_url)
    metering = await Database.open(
        metering_urls.app_url, migrations=str(METERING_MIGRATIONS), owner_url=metering_urls.owner_url
    )
    envelope = make_envelope(state, LocalDataKeyProvider(secrets.token_bytes(32)))
    log = ThreadLog(state, envelope, LIMITS)
    try:
        await fill(log, metering, state_events, usage_events)
        lifecycles = [
            TenantLifecycle("state", state, StateBase.metadata),
            TenantLifecycle("metering", metering, MeteringBase.metadata),
        ]
        writer = Writer(log)
        task = asyncio.create_task(writer.run())
        await asyncio.sleep(1.0)
        rows_out = []
        for source, target in HOPS:
            rows, paused = await hop(lifecycles, Tier.parse(source), Tier.parse(target))
            figures[f"{source}_to_{target}_rows_per_s"] = rows / paused
            figures[f"{source}_to_{target}_pause_ms"] = paused * 1000
            rows_out.append(
                (
                    f"{source} -> {target}",
                    f"{rows / paused:,.0f} rows/s",
                    f"{rows:,} rows; paused {paused * 1000:,.0f} ms (copy+verify+switch)",
                )
            )
            await asyncio.sleep(1.0)
        writer.stop.set()
        await task
        lat = writer.latencies
        figures.update(
            write_p50_ms=pct(lat, 0.5) * 1000,
            write_p99_ms=pct(lat, 0.99) * 1000,
            paused_write_p50_ms=pct(writer.pauses, 0.5) * 1000,
            paused_write_p99_ms=pct(writer.pauses, 0.99) * 1000,
        )
        rows_out.append(
            (
                "live writer: write latency p50 / p99 / max",
                f"{pct(lat, 0.5) * 1000:.1f} / {pct(lat, 0.99) * 1000:.1f} / {max(lat) * 1000:.0f} ms",
                f"{len(lat):,} writes, every one acknowledged",
            )
        )
        rows_out.append(
            (
                "live writer: paused writes p50 / p99",
                f"{pct(writer.pauses, 0.5) * 1000:,.0f} / {pct(writer.pauses, 0.99) * 1000:,.0f} ms",
                f"{len(writer.pauses)} writes waited on a pause (retried TENANT_MIGRATING)",
            )
        )
        return rows_out
    finally:
        envelope.forget()
        await state.close()
        await metering.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10k state events + 1k usage events")
    add_json_option(parser)
    args = parser.parse_args()
    state_events, usage_events = (10_000, 1_000) if args.quick else (100_000, 10_000)
    from testkit.postgres import start_postgres

    pg = start_postgres()
    figures: dict[str, float] = {}
    try:
        rows = asyncio.run(run(pg, state_events, usage_events, figures))
    finally:
        pg.stop()
    print(f"\nlive tier migration, {state_events:,} state events + {usage_events:,} usage events (Postgres)")
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>24}  {note}")
    write_json(args.json, figures)


if __name__ == "__main__":
    main()

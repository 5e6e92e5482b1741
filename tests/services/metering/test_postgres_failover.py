"""Metering on a Postgres primary with a synchronous streaming standby: the primary crashes
(`pg_ctl -m immediate`) mid-workload, the standby is promoted, metering reconnects through its
multi-host URL, and the ledger holds every acknowledged event exactly once."""

from __future__ import annotations

import asyncio
import collections
import time

import asyncpg
import grpc
import pytest

from bulkhead.metering.v1 import metering_pb2 as pb
from services.metering.server import MIGRATIONS
from shared.db import Database

from .conftest import start_harness
from .helpers import T0, day_range, event

pytestmark = pytest.mark.postgres

TENANT = "t_failover"
WORKERS = 4
BATCH = 5
BEFORE_STOP_S = 1.0
AFTER_RECOVERY_S = 1.0
MAX_GAP_S = 20.0


class Workload:
    """Batches sent until acknowledged (the same idempotency keys every time), and what failed."""

    def __init__(self) -> None:
        self.acked: set[str] = set()
        """Idempotency keys of every event in an acknowledged batch."""
        self.replies: list[tuple[int, int]] = []
        """(recorded, duplicates) per acknowledged batch."""
        self.failures: collections.Counter[str] = collections.Counter()
        """Failed attempts by status code."""
        self.successes: list[tuple[float, float]] = []
        """(start, end) of every acknowledged attempt."""


async def _worker(h, w: int, work: Workload, stop: asyncio.Event) -> None:
    """Send batch after batch; a failed batch is sent again, unchanged, until it is acknowledged."""
    n = 0
    md = h.md(TENANT)
    while not stop.is_set():
        keys = [f"w{w}-b{n}-e{i}" for i in range(BATCH)]
        request = pb.RecordUsageRequest(events=[event(k, at_us=T0 + n, input_tokens=7, output_tokens=3) for k in keys])
        while True:
            started = time.monotonic()
            try:
                reply = await h.stub.RecordUsage(request, metadata=md, timeout=10)
            except grpc.aio.AioRpcError as err:
                work.failures[err.code().name] += 1
                await asyncio.sleep(0.05)
                continue
            work.acked.update(keys)
            work.replies.append((reply.recorded_count, reply.duplicate_count))
            work.successes.append((started, time.monotonic()))
            break
        n += 1


@pytest.mark.parametrize("standby_first", [False, True], ids=["primary-first", "standby-first"])
async def test_metering_survives_a_primary_crash_and_promotion(postgres_replica, standby_first: bool):
    """Primary stopped (immediate) + standby promoted: writes resume through the multi-host URL,
    no acknowledged event is missing from the ledger and none is stored or counted twice.
    With the standby listed first, target_session_attrs=read-write is what keeps the service off
    the read-only standby until it is promoted."""
    pair = postgres_replica
    urls = await pair.primary.create_database("metering")
    await pair.wait_replayed()  # asyncpg gives up on a server that lacks the database
    db = await Database.open(
        pair.multi_host_url(urls.app_url, standby_first=standby_first),
        migrations=str(MIGRATIONS),
        pool_size=5,
        owner_url=pair.multi_host_url(urls.owner_url, standby_first=standby_first),
    )
    h, channel = await start_harness(db)
    work, stop = Workload(), asyncio.Event()
    try:
        tasks = [asyncio.create_task(_worker(h, w, work, stop)) for w in range(WORKERS)]
        await asyncio.sleep(BEFORE_STOP_S)
        before = len(work.acked)
        stopped_at = time.monotonic()
        pair.stop_primary()
        promote_s = await pair.promote()
        while not any(start >= stopped_at for start, _ in work.successes):
            assert time.monotonic() - stopped_at < MAX_GAP_S, f"no success {MAX_GAP_S}s after the stop\n{pair.logs()}"
            assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
            await asyncio.sleep(0.01)
        gap = min(end for start, end in work.successes if start >= stopped_at) - stopped_at
        at_recovery = len(work.acked)
        await asyncio.sleep(AFTER_RECOVERY_S)
        stop.set()
        await asyncio.gather(*tasks)
        print(
            f"\nPostgres primary stopped (immediate), standby promoted in {promote_s * 1000:.0f} ms; first "
            f"acknowledged batch {gap * 1000:.0f} ms after the stop; failed attempts {dict(work.failures)}; "
            f"{before} events acknowledged before, {len(work.acked) - before} after"
        )
        assert before > 0 and len(work.acked) > at_recovery, "the workload must write on both sides of the failover"
        # A refused connect during the promotion is UNAVAILABLE, which the channel retries by
        # itself; only a call whose transaction was running when the primary died may fail
        # otherwise (at most one per worker).
        assert set(work.failures) <= {"UNAVAILABLE", "INTERNAL"}, work.failures
        assert work.failures["INTERNAL"] <= WORKERS, work.failures

        # The ledger on the promoted standby: every acknowledged event, once.
        conn = await asyncpg.connect(pair.standby_admin_dsn().replace("/postgres", f"/{urls.name}"))
        try:
            assert not await conn.fetchval("SELECT pg_is_in_recovery()")
            rows = await conn.fetch(
                "SELECT idempotency_key, count(*) AS n FROM metering_usage_events "
                "WHERE tenant_id = $1 GROUP BY idempotency_key",
                TENANT,
            )
        finally:
            await conn.close()
        stored = {r["idempotency_key"]: r["n"] for r in rows}
        assert set(stored) == work.acked, (len(work.acked - set(stored)), len(set(stored) - work.acked))
        assert all(n == 1 for n in stored.values())
        # Counted once: metering called no event new twice. A batch whose commit landed but whose
        # reply was lost (only those in flight at the crash) comes back as duplicates when retried,
        # by the worker or by the channel's own retry policy.
        assert all(new + dup == BATCH for new, dup in work.replies)
        new = sum(n for n, _ in work.replies)
        assert len(work.acked) - WORKERS * BATCH <= new <= len(work.acked)
        usage = await h.stub.QueryUsage(pb.QueryUsageRequest(filter=day_range()), metadata=h.md(TENANT))
        assert sum(r.event_count for r in usage.rows) == len(work.acked)
        assert sum(r.tokens.input_tokens for r in usage.rows) == 7 * len(work.acked)
    finally:
        stop.set()
        await channel.close()
        await h.service.stop(grace=0)

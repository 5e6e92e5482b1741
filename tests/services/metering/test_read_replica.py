"""QueryUsage on a real streaming standby: RecordUsage answers with its WAL position, a query
carrying it counts the batch (the primary answers while the standby's replay is paused), one
without it counts what the standby has, and another tenant counts nothing there."""

from __future__ import annotations

import asyncpg
import pytest

from bulkhead.metering.v1 import metering_pb2 as pb
from services.metering.server import MIGRATIONS
from shared.db import LSN_HEADER, Database
from shared.db.replica import parse_lsn

from .conftest import start_harness
from .helpers import day_range, event

pytestmark = pytest.mark.postgres


async def _standby(pair, sql: str) -> None:
    conn = await asyncpg.connect(pair.standby_admin_dsn())
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _count(reply: pb.QueryUsageResponse) -> int:
    return sum(r.event_count for r in reply.rows)


async def test_query_usage_reads_the_standby_and_sees_the_callers_own_batch(postgres_replica):
    """Replay paused after a first batch: the second batch's LSN makes QueryUsage count both."""
    pair = postgres_replica
    urls = await pair.primary.create_database("metering")
    standby = urls.app_dsn.replace(f":{pair.primary_port}/", f":{pair.standby_port}/")
    db = await Database.open(urls.app_url, migrations=str(MIGRATIONS), owner_url=urls.owner_url, read_url=standby)
    h, channel = await start_harness(db)
    try:
        md = h.md("t_reader")
        await h.stub.RecordUsage(pb.RecordUsageRequest(events=[event("e1")]), metadata=md)
        await pair.wait_replayed()
        await _standby(pair, "SELECT pg_wal_replay_pause()")
        call = h.stub.RecordUsage(pb.RecordUsageRequest(events=[event("e2")]), metadata=md)
        assert (await call).recorded_count == 1
        lsn = dict(await call.trailing_metadata()).get(LSN_HEADER)
        assert parse_lsn(lsn) is not None, lsn

        query = pb.QueryUsageRequest(filter=day_range())
        assert _count(await h.stub.QueryUsage(query, metadata=md)) == 1
        assert _count(await h.stub.QueryUsage(query, metadata=(*md, (LSN_HEADER, lsn)))) == 2
        assert _count(await h.stub.QueryUsage(query, metadata=(*h.md("t_other"), (LSN_HEADER, lsn)))) == 0
    finally:
        await channel.close()
        await h.service.stop(0)

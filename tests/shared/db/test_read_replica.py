"""Reads on a real streaming standby (pg_basebackup -R): stale without an LSN, the caller's own
write with one (the primary answers when the standby is behind), RLS as on the primary, and every
tier; SQLite and a database without a read URL behave as before."""

from __future__ import annotations

import time
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import select, text

from shared.config import ServiceConfig
from shared.db import Database, reading_after
from shared.db.replica import format_lsn, lsn_from, parse_lsn
from shared.tenancy import tenant_scope
from testkit.procs import free_port

from .conftest import MIGRATIONS, as_tenant
from .notes import Note

READ_WAIT = 0.05


def _on_standby(url: str, pair) -> str:
    return url.replace(f":{pair.primary_port}/", f":{pair.standby_port}/")


async def _open(pair, *, createdb: bool = False) -> Database:
    urls = await pair.primary.create_database("notes")
    if createdb:
        admin = await asyncpg.connect(pair.primary.admin_dsn)
        try:
            await admin.execute(f'ALTER ROLE "{urls.owner_role}" CREATEDB')
        finally:
            await admin.close()
    db = await Database.open(
        urls.app_url,
        owner_url=urls.owner_url,
        migrations=MIGRATIONS,
        read_url=_on_standby(urls.app_dsn, pair),
        read_wait=READ_WAIT,
    )
    await pair.wait_replayed()  # the database and its tables exist on the standby
    return db


async def _standby(pair, sql: str) -> None:
    conn = await asyncpg.connect(pair.standby_admin_dsn())
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _write(db: Database, tenant: str, body: str, tier: str = "pooled") -> str:
    with tenant_scope(as_tenant(tenant, tier)):
        async with db.session() as s:
            s.add(Note(body=body))
        lsn = await db.written_lsn()
    assert parse_lsn(lsn) is not None, lsn
    return lsn


async def _read(
    db: Database, tenant: str, tier: str = "pooled", *, after: str | None = None, raw: bool = False
) -> tuple[list[str], bool]:
    """(note bodies, whether the read ran on the standby); raw=True reads with no ORM filter (RLS only)."""
    with tenant_scope(as_tenant(tenant, tier)), reading_after(parse_lsn(after)):
        async with db.read_session() as s:
            query = text("SELECT body FROM notes ORDER BY id") if raw else select(Note.body).order_by(Note.id)
            bodies = list((await s.execute(query)).scalars())
            on_standby = await s.scalar(text("SELECT pg_is_in_recovery()"))
    return bodies, on_standby


@pytest.mark.postgres
async def test_a_read_with_the_writes_lsn_sees_it_while_one_without_reads_the_stale_standby(postgres_replica):
    """Replay paused: no LSN → the standby's stale rows; the write's LSN → the primary after the
    bounded wait; replay resumed → the standby serves the LSN read itself."""
    pair = postgres_replica
    db = await _open(pair)
    try:
        await _write(db, "t_a", "before")
        await pair.wait_replayed()
        await _standby(pair, "SELECT pg_wal_replay_pause()")
        lsn = await _write(db, "t_a", "after")

        assert await _read(db, "t_a") == (["before"], True)
        started = time.monotonic()
        assert await _read(db, "t_a", after=lsn) == (["before", "after"], False)
        assert time.monotonic() - started >= READ_WAIT  # it waited for the standby first

        await _standby(pair, "SELECT pg_wal_replay_resume()")
        await pair.wait_replayed()
        assert await _read(db, "t_a", after=lsn) == (["before", "after"], True)
    finally:
        await db.close()


@pytest.mark.postgres
async def test_rls_confines_reads_on_the_standby(postgres_replica):
    """On the standby the runtime role still sees only its tenant, even through SQL without a filter."""
    pair = postgres_replica
    db = await _open(pair)
    try:
        await _write(db, "t_a", "a-secret")
        await _write(db, "t_b", "b-note")
        await pair.wait_replayed()
        assert await _read(db, "t_a", raw=True) == (["a-secret"], True)
        assert await _read(db, "t_b", raw=True) == (["b-note"], True)
        assert await _read(db, "t_c", raw=True) == ([], True)
    finally:
        await db.close()


@pytest.mark.postgres
@pytest.mark.parametrize("tier", ["bridge", "silo"])
async def test_bridge_and_silo_tenants_read_their_own_store_on_the_standby(postgres_replica, tier: str):
    """A bridge schema or silo database is read on the standby once replayed; before that (replay
    paused when it was made) the read goes to the primary instead of failing."""
    pair = postgres_replica
    db = await _open(pair, createdb=True)
    try:
        await _write(db, "t_early", "early", tier)
        await pair.wait_replayed()
        assert await _read(db, "t_early", tier) == (["early"], True)
        assert await _read(db, "t_pool", raw=True) == ([], True)  # the pooled tables hold no tier rows

        await _standby(pair, "SELECT pg_wal_replay_pause()")
        await _write(db, "t_late", "late", tier)  # its schema/database is not on the standby yet
        assert await _read(db, "t_late", tier) == (["late"], False)
    finally:
        await db.close()


async def test_sqlite_and_no_read_url_read_on_the_one_database(sqlite_db: Database, tmp_path: Path):
    """Without a read URL read_session() is session() and writes carry no LSN; SQLite takes no replica."""
    with tenant_scope(as_tenant("t_a")):
        async with sqlite_db.session() as s:
            s.add(Note(body="x"))
        assert await sqlite_db.written_lsn() is None
        with reading_after(parse_lsn("0/1")):
            async with sqlite_db.read_session() as s:
                assert list((await s.execute(select(Note.body))).scalars()) == ["x"]
    assert not sqlite_db.has_replica
    with pytest.raises(ValueError, match="Postgres"):
        await Database.open(f"sqlite:///{tmp_path}/x.db", read_url="postgresql://u@127.0.0.1:1/x")


def test_lsn_text_round_trips_and_compares():
    """LSNs parse to numbers that order like WAL positions; junk and absent headers are None."""
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert format_lsn(parse_lsn("16/B374D848")) == "16/B374D848"
    assert parse_lsn("1/0") > parse_lsn("0/FFFFFFFF")
    assert parse_lsn("x/1") is None and parse_lsn("") is None and parse_lsn(None) is None
    md = (("x-bulkhead-lsn", "0/10"), ("x-bulkhead-lsn", "0/9"), ("x-bulkhead-lsn", "zz"), ("other", "1/0"))
    assert lsn_from(md) == 0x10
    assert lsn_from(()) is None


def test_config_read_url_per_service_or_shared_only_with_the_shared_database():
    """BULKHEAD_<SVC>_DATABASE_READ_URL wins; the shared one applies only to services on the shared URL."""
    shared = {"BULKHEAD_DATABASE_URL": "postgresql://a@p/db", "BULKHEAD_DATABASE_READ_URL": "postgresql://a@r/db"}
    assert ServiceConfig.from_env("state", {}).database_read_url is None
    assert ServiceConfig.from_env("state", shared).database_read_url == "postgresql://a@r/db"
    own = {**shared, "BULKHEAD_STATE_DATABASE_URL": "postgresql://a@p/state"}
    assert ServiceConfig.from_env("state", own).database_read_url is None
    own["BULKHEAD_STATE_DATABASE_READ_URL"] = "postgresql://a@r/state"
    assert ServiceConfig.from_env("state", own).database_read_url == "postgresql://a@r/state"


@pytest.mark.postgres
async def test_an_unreachable_replica_leaves_reads_to_the_primary(pg_urls):
    """A read URL nobody answers on: reads run on the primary instead of failing."""
    db = await Database.open(
        pg_urls.app_url,
        owner_url=pg_urls.owner_url,
        migrations=MIGRATIONS,
        read_url=f"postgresql://bulkhead_app:x@127.0.0.1:{free_port()}/nowhere",
    )
    try:
        await _write(db, "t_a", "kept")
        for _ in range(2):  # the second one skips the replica for a while
            assert await _read(db, "t_a") == (["kept"], False)
    finally:
        await db.close()

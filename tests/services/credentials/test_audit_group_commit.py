"""The access audit's fast append (issue 16): concurrent events share one commit made on the event
loop's thread when the SQLite file is free, in call order, and a busy file sends the append to the
writer thread instead of blocking the loop. No read answers before its event is committed."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from bulkhead.credentials.v1 import credentials_pb2 as pb
from services.credentials import sqlite_inline
from services.credentials.audit import AuditLog
from shared.tenancy import TenantContext, tenant_scope
from tests.services.credentials.conftest import open_db

KEY = b"k" * 32


@pytest.fixture(autouse=True)
def _no_slow_backoff(monkeypatch):
    """A loaded test machine can make any commit "slow"; the tests that count which path ran say
    when they want the back-off (test_after_a_slow_inline_commit_...)."""
    monkeypatch.setattr(sqlite_inline, "SLOW_SECONDS", 60.0)


def _counting(monkeypatch, cls, name: str) -> list[int]:
    """Count calls of cls.name (still calling it); returns the list the counts go to."""
    calls: list[int] = []
    original = getattr(cls, name)

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return calls


async def test_concurrent_events_share_one_inline_commit_in_call_order(tmp_path, migrated_template, monkeypatch):
    """40 concurrent events: committed on the loop's thread in far fewer transactions than events, with
    sequence numbers in the order the calls were made, and the chain verifies."""
    from services.credentials.sqlite_writer import SqliteWriter

    db = await open_db(tmp_path, migrated_template)
    log = AuditLog(db, KEY)
    inline = _counting(monkeypatch, sqlite_inline.InlineSqlite, "run")
    threaded = _counting(monkeypatch, SqliteWriter, "run")
    try:
        with tenant_scope(TenantContext("t_groupinline", "p_test", request_id="r")):
            await asyncio.gather(*(log.record("get", "allowed", secret_name=f"s{i}") for i in range(40)))
            rows = await log.page(after_seq=0, limit=100)
            report = await log.verify()
        assert [(r.seq, r.secret_name) for r in rows] == [(i + 1, f"s{i}") for i in range(40)]
        assert report.intact and report.checked == 40
        assert 1 <= len(inline) <= 3 and not threaded
    finally:
        await log.close()
        await db.close()


async def test_a_busy_file_goes_to_the_writer_thread_without_blocking_the_loop(tmp_path, migrated_template):
    """Another connection holds the write lock: the append waits in the writer thread (the loop keeps
    turning), commits once the lock is released, and only then does the caller return."""
    db = await open_db(tmp_path, migrated_template)
    log = AuditLog(db, KEY)
    blocker = sqlite3.connect(tmp_path / "credentials.db", isolation_level=None)
    try:
        with tenant_scope(TenantContext("t_busyfile", "p_test", request_id="r")):
            await log.record("get", "allowed", secret_name="first")
            blocker.execute("BEGIN IMMEDIATE")
            pending = asyncio.ensure_future(log.record("get", "allowed", secret_name="second"))
            turns = 0
            for _ in range(20):  # the loop is free while the append waits for the lock
                await asyncio.sleep(0.005)
                turns += 1
            assert turns == 20 and not pending.done()
            blocker.execute("COMMIT")
            await asyncio.wait_for(pending, 10)
            rows = await log.page(after_seq=0, limit=10)
            report = await log.verify()
        assert [(r.seq, r.secret_name) for r in rows] == [(1, "first"), (2, "second")]
        assert report.intact
    finally:
        blocker.close()
        await log.close()
        await db.close()


async def test_after_a_slow_inline_commit_appends_go_to_the_writer_thread(tmp_path, migrated_template, monkeypatch):
    """A commit that held the loop too long (a stalling disk) sends the next appends to the writer
    thread for a while; the chain stays one gapless chain."""
    from services.credentials.sqlite_writer import SqliteWriter

    monkeypatch.setattr(sqlite_inline, "SLOW_SECONDS", 0.0)  # every inline commit counts as slow
    db = await open_db(tmp_path, migrated_template)
    log = AuditLog(db, KEY)
    inline = _counting(monkeypatch, sqlite_inline.InlineSqlite, "run")
    threaded = _counting(monkeypatch, SqliteWriter, "run")
    try:
        with tenant_scope(TenantContext("t_slowdisk", "p_test", request_id="r")):
            for i in range(3):
                await log.record("get", "allowed", secret_name=f"s{i}")
            rows = await log.page(after_seq=0, limit=10)
            assert (await log.verify()).intact
        assert [(r.seq, r.secret_name) for r in rows] == [(1, "s0"), (2, "s1"), (3, "s2")]
        assert len(inline) == 3 and len(threaded) == 2  # the 2nd and 3rd were refused inline
    finally:
        await log.close()
        await db.close()


async def test_a_cancelled_caller_still_gets_its_event_committed(tmp_path, migrated_template):
    """A caller that stops waiting (deadline, cancel) does not take its event out of the chain."""
    db = await open_db(tmp_path, migrated_template)
    log = AuditLog(db, KEY)
    try:
        with tenant_scope(TenantContext("t_cancelled", "p_test", request_id="r")):
            waiting = asyncio.ensure_future(log.record("get", "allowed", secret_name="gone"))
            await asyncio.sleep(0)
            waiting.cancel()
            await log.record("get", "allowed", secret_name="next")
            rows = await log.page(after_seq=0, limit=10)
            assert (await log.verify()).intact
        assert [(r.seq, r.secret_name) for r in rows] == [(1, "gone"), (2, "next")]
    finally:
        await log.close()
        await db.close()


async def test_the_inline_connection_checkpoints_the_wal_in_a_worker_thread(tmp_path, migrated_template, monkeypatch):
    """The inline connection never checkpoints on commit; every CHECKPOINT_EVERY commits one passive
    checkpoint runs off the loop, so the WAL does not grow without bound."""
    monkeypatch.setattr(sqlite_inline, "CHECKPOINT_EVERY", 5)
    done: list[str] = []
    original = sqlite_inline._checkpoint
    monkeypatch.setattr(sqlite_inline, "_checkpoint", lambda path: (original(path), done.append(path)))
    db = await open_db(tmp_path, migrated_template)
    log = AuditLog(db, KEY)
    try:
        with tenant_scope(TenantContext("t_checkpoint", "p_test", request_id="r")):
            for i in range(12):
                await log.record("get", "allowed", secret_name=f"s{i}")
            await log.close()  # waits for checkpoints in flight
            # one at commit 5; one more at commit 10 or later unless the first was still running then
            assert done[:1] == [str(tmp_path / "credentials.db")] and len(done) <= 2
            assert (await log.verify()).intact
    finally:
        await db.close()


async def test_getsecret_answers_only_after_its_event_is_committed(lh, monkeypatch):
    """The server's read path: while the audit commit is held back, GetSecret does not answer; once it
    commits, the reply comes, and there is exactly one event per read."""
    await lh.put("held", b"held-value-1")
    gate = asyncio.Event()
    original = AuditLog._append

    async def held(self, tenant_id, batch):
        await gate.wait()
        return await original(self, tenant_id, batch)

    monkeypatch.setattr(AuditLog, "_append", held)
    reads = [asyncio.ensure_future(lh.get("held")) for _ in range(5)]
    await asyncio.sleep(0.3)
    assert not any(r.done() for r in reads)
    gate.set()
    assert [r.value for r in await asyncio.gather(*reads)] == [b"held-value-1"] * 5
    gets = [e for e in await lh.events() if e.action == pb.ACCESS_ACTION_GET]
    assert [(e.secret_name, e.outcome) for e in gets] == [("held", pb.ACCESS_OUTCOME_ALLOWED)] * 5


async def test_events_arriving_over_several_busy_turns_share_one_commit(tmp_path, migrated_template, monkeypatch):
    """Calls that reach their event a few loop turns apart while the loop is busy (as gRPC hands a burst of
    reads over) share one commit: the batch waits while other callbacks are ready."""
    db = await open_db(tmp_path, migrated_template)
    log = AuditLog(db, KEY)
    inline = _counting(monkeypatch, sqlite_inline.InlineSqlite, "run")

    async def after(turns: int, name: str) -> None:
        for _ in range(turns):
            await asyncio.sleep(0)
        await log.record("get", "allowed", secret_name=name)

    try:
        with tenant_scope(TenantContext("t_busyturns", "p_test", request_id="r")):
            await asyncio.gather(*(after(i, f"s{i}") for i in range(6)))
            rows = await log.page(after_seq=0, limit=10)
            assert (await log.verify()).intact
        assert [(r.seq, r.secret_name) for r in rows] == [(i + 1, f"s{i}") for i in range(6)]
        assert len(inline) == 1
    finally:
        await log.close()
        await db.close()


async def test_a_loop_that_never_idles_still_gets_its_commit(tmp_path, migrated_template):
    """The wait for a quiet loop is bounded: with another task ready on every turn, the event is committed
    within GATHER_TURNS and a few more turns (no wait without end under load)."""
    from services.credentials import audit

    db = await open_db(tmp_path, migrated_template)
    log = AuditLog(db, KEY)
    turns = 0
    stop = False

    async def spin() -> None:
        nonlocal turns
        while not stop:
            turns += 1
            await asyncio.sleep(0)

    spinner = asyncio.ensure_future(spin())
    try:
        with tenant_scope(TenantContext("t_neveridle", "p_test", request_id="r")):
            await log.record("get", "allowed", secret_name="first")  # the tenant's database is set up
            start = turns
            await asyncio.wait_for(log.record("get", "allowed", secret_name="second"), 10)
            assert turns - start <= audit.GATHER_TURNS + 8  # + the turns of the call itself (task, wait_for)
            assert (await log.verify()).checked == 2
    finally:
        stop = True
        await spinner
        await log.close()
        await db.close()


def test_a_file_held_exclusively_when_first_opened_is_busy_not_an_error(tmp_path):
    """Opening the inline connection sets WAL, which waits for nobody: while another connection holds the file
    exclusively (another replica's first open or migration), the run is Busy (the append goes to the writer
    thread), nothing half-opened is kept, and the next run opens the file and commits."""
    path = str(tmp_path / "held.db")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x INTEGER)")
    inline = sqlite_inline.InlineSqlite()
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(sqlite_inline.Busy):
            inline.run(path, lambda conn: conn.execute("INSERT INTO t VALUES (1)"))
        holder.execute("COMMIT")
        inline.run(path, lambda conn: conn.execute("INSERT INTO t VALUES (2)"))
        assert holder.execute("SELECT x FROM t").fetchall() == [(2,)]
        assert holder.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        asyncio.run(inline.close())
        holder.close()

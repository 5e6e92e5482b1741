"""The journal's groups: on SQLite one trip to the driver's thread (all or nothing, the pooled connection
back clean whether the group committed, failed or was cancelled); on Postgres one statement. Either way
a group writes what its opens, settles and deliveries would as separate statements."""

from __future__ import annotations

import asyncio

import pytest

from services.inference.attempts import DELIVERED, OPEN, SETTLED, NewAttempt
from services.inference.budget import Tokens
from services.inference.server import MIGRATIONS
from services.inference.store import SqlAttempts
from shared.db import Database
from testkit.pool import until_kept_connections_went_back


@pytest.fixture
async def db(tmp_path):
    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'j.db'}", migrations=str(MIGRATIONS))
    yield db
    await db.close()


def _open(request_id: str) -> NewAttempt:
    return NewAttempt("t_a", request_id, "m", Tokens(3, 4), "{}", 1)


async def test_a_failed_group_writes_nothing_and_the_next_one_commits(db):
    """A bad settle fails the group after its insert ran: the insert is rolled back with it, the
    connection is back in the pool outside any transaction, and the next group commits."""
    store = SqlAttempts(db)
    with pytest.raises(Exception):  # noqa: B017 - the driver's own error for a row of the wrong shape
        await store.apply([_open("r1")], [("not a settle",)], [], "rep")
    assert await store.rows() == []
    await until_kept_connections_went_back(db.engine.sync_engine.pool)
    ((row_id, number),) = await store.apply([_open("r1")], [], [], "rep")
    assert number == 1
    await store.apply([], [(row_id, 5, 6, 0, 0, "success", 7, 0)], [row_id], "rep")
    assert [(r[1], r[2], r[3], r[7], r[8]) for r in await store.rows()] == [("r1", 1, 2, 5, 6)]


async def test_a_cancelled_group_leaves_the_pool_clean(db):
    """Cancelled while the driver's thread runs it: the group committed or not, whole; the connection
    is never handed back in a transaction, so every later group commits."""
    store = SqlAttempts(db)
    for i in range(20):
        task = asyncio.create_task(store.apply([_open(f"c{i}")], [], [], "rep"))
        for _ in range(i % 4):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await until_kept_connections_went_back(db.engine.sync_engine.pool)
    before = len(await store.rows())
    assert all(r[2] == 1 for r in await store.rows())  # each request id written at most once
    ids = await asyncio.gather(*(store.apply([_open(f"n{i}")], [], [], "rep") for i in range(5)))
    assert [n for ((_, n),) in ids] == [1] * 5
    assert len(await store.rows()) == before + 5


async def test_one_group_settles_delivers_and_opens_as_separate_writes_would(journal_db):
    """In one group: a row settled and delivered ends done with its usage; a row only settled keeps its
    usage, open no more; a row only delivered is done; a settle of a row no longer open changes nothing
    (but its delivery still closes it); and the group's opens get their numbers."""
    store = SqlAttempts(journal_db)
    ids = [i for ((i, _),) in [await store.apply([_open(f"g{k}")], [], [], "rep") for k in range(4)]]
    a, b, c, d = ids
    await store.apply([], [], [d], "rep")  # d is done before the group
    opened = await store.apply(
        [_open("g0"), _open("new")],
        [(a, 1, 2, 3, 4, "success", 5, 0), (b, 6, 7, 0, 0, "error", 8, 1), (d, 9, 9, 9, 9, "success", 9, 0)],
        [a, c, d],
        "rep",
    )
    assert [n for _, n in opened] == [2, 1]
    rows = {(r[1], r[2]): (r[3], r[4], r[7], r[8], r[9], r[10]) for r in await store.rows()}
    assert rows == {
        ("g0", 1): (DELIVERED, 0, 1, 2, 3, 4),
        ("g1", 1): (SETTLED, 1, 6, 7, 0, 0),
        ("g2", 1): (DELIVERED, 0, 0, 0, 0, 0),
        ("g3", 1): (DELIVERED, 0, 0, 0, 0, 0),
        ("g0", 2): (OPEN, 0, 0, 0, 0, 0),
        ("new", 1): (OPEN, 0, 0, 0, 0, 0),
    }

"""The SQLite writer: each unit of work commits whole or not at all, on the engine's own file."""

from __future__ import annotations

import sqlite3

import pytest

from services.credentials.sqlite_writer import SqliteWriter


@pytest.fixture
async def writer():
    """A writer, closed after the test."""
    w = SqliteWriter()
    try:
        yield w
    finally:
        await w.close()


def _table(path) -> str:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (tenant_id TEXT, n INTEGER)")
    conn.commit()
    conn.close()
    return str(path)


def _rows(path: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT tenant_id, n FROM t ORDER BY n").fetchall()
    finally:
        conn.close()


async def test_a_unit_of_work_is_committed_and_returns_its_result(writer, tmp_path):
    """What the work wrote is visible to other connections once run() returns."""
    path = _table(tmp_path / "w.db")

    def work(conn):
        conn.executemany("INSERT INTO t VALUES (?, ?)", [("t_a", 1), ("t_a", 2)])
        return "done"

    assert await writer.run(path, work) == "done"
    assert _rows(path) == [("t_a", 1), ("t_a", 2)]


async def test_a_failing_unit_of_work_leaves_nothing_behind(writer, tmp_path):
    """An exception after a first insert rolls the whole transaction back and reaches the caller."""
    path = _table(tmp_path / "w.db")

    def work(conn):
        conn.execute("INSERT INTO t VALUES ('t_a', 1)")
        raise RuntimeError("half way")

    with pytest.raises(RuntimeError, match="half way"):
        await writer.run(path, work)
    assert _rows(path) == []
    await writer.run(path, lambda conn: conn.execute("INSERT INTO t VALUES ('t_a', 2)"))  # the connection is usable
    assert _rows(path) == [("t_a", 2)]


async def test_each_file_gets_its_own_connection(writer, tmp_path):
    """Bridge/silo tenants on SQLite have files of their own: writes land in the file named."""
    first, second = _table(tmp_path / "a.db"), _table(tmp_path / "b.db")
    await writer.run(first, lambda conn: conn.execute("INSERT INTO t VALUES ('t_a', 1)"))
    await writer.run(second, lambda conn: conn.execute("INSERT INTO t VALUES ('t_b', 1)"))
    assert (_rows(first), _rows(second)) == ([("t_a", 1)], [("t_b", 1)])

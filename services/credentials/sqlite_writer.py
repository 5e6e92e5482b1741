"""Whole SQLite write transactions run as one unit in a writer thread: the audit append on every
GetSecret.

Through aiosqlite and the engine's pool, BEGIN + two statements + COMMIT is six thread hops plus a
pool checkout: about 1 ms at one caller on this machine, 0.8 ms of it on the event loop's CPU. Here
the transaction is one function run on the writer's own connection in its own thread: one hop,
about 0.3 ms. SQLite admits one writer at a time anyway, so one thread loses no parallelism.
Statements still name tenant_id themselves, as they must on SQLite (no row-level security).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class SqliteWriter:
    """One thread and one connection per database file; each `run` is BEGIN IMMEDIATE .. COMMIT."""

    def __init__(self, *, busy_timeout_ms: int = 5000) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        self._connections: dict[str, sqlite3.Connection] = {}
        self._busy_timeout_ms = busy_timeout_ms

    async def run(self, path: str, work: Callable[[sqlite3.Connection], T]) -> T:
        """work(connection) inside one write transaction on the file at path: committed when it
        returns, rolled back when it raises (the exception is re-raised here)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._transaction, path, work)

    async def close(self) -> None:
        """Close the connections and stop the thread (after the last run)."""
        await asyncio.get_running_loop().run_in_executor(self._thread, self._close_all)
        self._thread.shutdown(wait=True)

    def _transaction(self, path: str, work: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._connections.get(path) or self._open(path)
        conn.execute("BEGIN IMMEDIATE")  # the write lock up front: no failed upgrade from reader
        try:
            result = work(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    def _open(self, path: str) -> sqlite3.Connection:
        # Same settings as the engine's connections (shared.db.engine): WAL, NORMAL sync, busy wait.
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        self._connections[path] = conn
        return conn

    def _close_all(self) -> None:
        connections, self._connections = self._connections, {}
        for conn in connections.values():
            conn.close()

"""The audit append on the event loop's own thread when the SQLite file's write lock is free.

A write transaction of a few rows in WAL mode (synchronous=NORMAL: the commit is a write() to the
WAL, no fsync) takes tens of microseconds. Handing it to the SqliteWriter's thread costs more than
the work: a thread hop there and a wake-up of the loop back, about 0.2 ms of CPU per commit here.
So the commit runs inline, and only when the lock is free at once: the inline connection waits
for nothing (busy_timeout 0) and a busy file sends the work to the writer thread, which waits
for its turn as before. The loop therefore never blocks on another writer.

A commit that held the loop longer than SLOW_SECONDS (a disk stalling under other writers, a
descheduled process) sends the next BACKOFF_SECONDS of appends to the writer thread, so a slow disk
stalls the audit only, not every call the loop serves.

The inline connection does not checkpoint on commit (a checkpoint syncs the database file): every
CHECKPOINT_EVERY inline commits, one passive checkpoint runs in a worker thread instead.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

CHECKPOINT_EVERY = 500
"""Inline commits between two checkpoints of a file (a WAL of a few hundred small commits)."""

SLOW_SECONDS = 0.005
"""An inline transaction taking longer than this held the loop too long..."""
BACKOFF_SECONDS = 1.0
"""...and the appends of the next second go to the writer thread."""


class Busy(Exception):
    """The file's write lock is held elsewhere: run the work on the writer thread instead."""


class InlineSqlite:
    """One connection per database file, used from the event loop thread, never waiting for a lock."""

    def __init__(self) -> None:
        self._connections: dict[str, sqlite3.Connection] = {}
        self._commits: dict[str, int] = {}
        self._checkpoints: dict[str, asyncio.Future] = {}
        self._lock = threading.Lock()  # one transaction at a time, whichever thread calls
        self._inline_after = 0.0  # time.monotonic() before which every run is Busy (after a slow one)

    def run(self, path: str, work: Callable[[sqlite3.Connection], T]) -> T:
        """work(connection) in one write transaction, committed when it returns, rolled back when it
        raises (re-raised). Raises Busy, having done nothing, when the lock is not free at once or
        a recent inline transaction was slow."""
        if time.monotonic() < self._inline_after or not self._lock.acquire(blocking=False):
            raise Busy()
        try:
            conn = self._connections.get(path) or self._open(path)
            start = time.monotonic()  # opening the file the first time is not the loop's per-call cost
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if _is_busy(exc):
                    raise Busy() from None
                raise
            try:
                result = work(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            if time.monotonic() - start > SLOW_SECONDS:
                self._inline_after = time.monotonic() + BACKOFF_SECONDS
        finally:
            self._lock.release()
        self._after_commit(path)
        return result

    async def close(self) -> None:
        """Wait for checkpoints in flight, then close the connections."""
        for pending in list(self._checkpoints.values()):
            await asyncio.wait([pending])
        with self._lock:
            connections, self._connections = self._connections, {}
        for conn in connections.values():
            conn.close()

    def _after_commit(self, path: str) -> None:
        count = self._commits.get(path, 0) + 1
        if count < CHECKPOINT_EVERY or path in self._checkpoints:
            self._commits[path] = count
            return
        self._commits[path] = 0
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.run_in_executor(None, _checkpoint, path)
        self._checkpoints[path] = task
        task.add_done_callback(lambda _: self._checkpoints.pop(path, None))

    def _open(self, path: str) -> sqlite3.Connection:
        # The engine's settings (shared.db.engine: WAL, NORMAL sync), but no waiting and no checkpoints.
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout=0")
            # Busy while another connection holds the file exclusively (another replica's first open or
            # migration, a closing connection's checkpoint): Busy, as for BEGIN, and opened again next time.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA wal_autocheckpoint=0")
        except sqlite3.OperationalError as exc:
            conn.close()
            if _is_busy(exc):
                raise Busy() from None
            raise
        self._connections[path] = conn
        return conn


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def _checkpoint(path: str) -> None:
    """A passive checkpoint on a connection of its own (copies what no reader needs; never waits)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout=0")
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    except sqlite3.OperationalError:
        pass  # busy: the next one, or any other connection's autocheckpoint, does it
    finally:
        conn.close()

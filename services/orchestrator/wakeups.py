"""Queue wake-ups across replicas: Postgres LISTEN/NOTIFY on a dedicated connection.

Whatever changes the run queue in a way another replica should act on at once (a run queued, a
lease given back, a slot freed) sends NOTIFY on QUEUE_CHANNEL in its own transaction, so the
notice goes out when it commits. Every replica LISTENs on one connection of its own (a pooled
one would go back to the pool) and wakes its dispatcher. The dispatcher still polls: a notice
lost while the connection was down only costs one poll interval, and expired leases have no
notice at all. On SQLite (one process) and behind a transaction pooler (PgBouncer does not carry
LISTEN) there is no listener; the in-process wake() does the job there.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger("bulkhead.orchestrator.wakeups")

QUEUE_CHANNEL = "bulkhead_orch_queue"
"""The NOTIFY channel of the run queue (a notice only says "look"; its payload is the sender's replica id)."""

NOTIFY_SQL = f"SELECT pg_notify('{QUEUE_CHANNEL}', $1)"
"""Sent inside a queue-changing transaction on Postgres (delivered at its commit); $1 names the
replica that sent it, which has woken its own dispatcher already and ignores its own notice."""


def listens(engine: AsyncEngine) -> bool:
    """Whether a replica on this engine can hear queue notices (Postgres, not through a pooler)."""
    return engine.dialect.name == "postgresql" and "pgbouncer" not in engine.url.drivername


class QueueListener:
    """LISTEN on QUEUE_CHANNEL and call `wake` on every notice; reconnects while running."""

    def __init__(self, engine: AsyncEngine, wake: Callable[[], None], *, origin: str = "", retry_seconds: float = 1.0):
        """origin: this replica's id; its own notices are ignored (its changes wake it in-process)."""
        self._engine, self._wake, self._origin, self._retry = engine, wake, origin, retry_seconds
        self._task: asyncio.Task | None = None
        self._conn: Any = None
        self.connected = asyncio.Event()
        """Set while the listening connection is up (tests wait on it)."""

    def start(self) -> None:
        """Begin listening in the background (no-op where notices cannot be heard)."""
        if listens(self._engine) and self._task is None:
            self._task = asyncio.create_task(self._run(), name="orchestrator-queue-listener")

    async def stop(self) -> None:
        """Stop listening and close the connection."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._close()

    async def _run(self) -> None:
        import asyncpg  # type: ignore[import-untyped]

        _, params = self._engine.dialect.create_connect_args(self._engine.url)
        while True:
            lost = asyncio.Event()
            try:
                self._conn = await asyncpg.connect(**params)
                self._conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await self._conn.add_listener(QUEUE_CHANNEL, self._notified)
                self.connected.set()
                self._wake()  # anything queued while we were not listening
                await lost.wait()
                log.warning("queue listener connection lost; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception:  # the database may be away: polling covers until it is back
                log.warning("queue listener could not connect; retrying", exc_info=True)
            finally:
                self.connected.clear()
                await self._close()
            await asyncio.sleep(self._retry)

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if not (self._origin and payload == self._origin):
            self._wake()

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)

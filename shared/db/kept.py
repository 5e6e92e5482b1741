"""Idle pooled connections the raw paths keep between calls, so a busy service skips the pool.

Checking a connection out of SQLAlchemy's pool and back in costs about 35 µs of CPU per call (pool
events, the fairy's bookkeeping, and a greenlet each way), several times what a one-statement round
trip on a held asyncpg connection costs. Under load the raw paths (shared.db.raw) hand the next
call the connection the last one just finished with instead; one left idle HOLD_S goes back to the
pool, so a quiet service holds nothing and the ORM's sessions keep the rest of the pool.

Only a connection known to be idle is kept (its transaction committed or rolled back, nothing
session-level set: the raw paths set the tenant transaction-locally), so the next call sees what a
fresh checkout would. Kept connections stay checked out as far as the pool knows: at most half the
pool's size is kept, and disposing of the engine closes them (the pool no longer knows them).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool
from sqlalchemy.util.concurrency import greenlet_spawn

log = logging.getLogger("bulkhead.db")

HOLD_S = 0.05
"""How long a kept connection may sit idle before it goes back to the pool."""


class Keeper:
    """The idle connections kept for one engine's pool, on one event loop."""

    __slots__ = ("_idle", "_loop", "_returning", "_sweeping", "cap")

    def __init__(self, cap: int, loop: asyncio.AbstractEventLoop) -> None:
        self.cap = cap
        self._loop = loop
        self._idle: list[tuple[Any, float]] = []
        """(fairy, when it went idle), most recent last."""
        self._sweeping = False
        self._returning: set[asyncio.Task] = set()
        """Hand-backs under way (held here: the loop keeps only weak references to tasks)."""

    def take(self) -> Any | None:
        """The most recently idle connection, or None (then check one out of the pool)."""
        if self._here() and self._idle:
            return self._idle.pop()[0]
        return None

    def give(self, fairy: Any) -> bool:
        """Keep an idle connection for the next call; False when full (hand it back to the pool instead)."""
        if len(self._idle) >= self.cap or not self._here():
            return False
        self._idle.append((fairy, time.monotonic()))
        if not self._sweeping:
            self._sweeping = True
            self._loop.call_later(HOLD_S, self._sweep)
        return True

    def _here(self) -> bool:
        """Whether this runs on the keeper's loop; one whose loop closed (a test's) moves to the running loop."""
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return True
        if not self._loop.is_closed():
            return False  # another loop's connections: never handed across loops
        self.close()
        self._loop, self._sweeping = loop, False
        return True

    def _sweep(self) -> None:
        """Hand back to the pool the connections idle HOLD_S or longer; look again later while some are kept."""
        due = time.monotonic() - HOLD_S
        stale = [fairy for fairy, since in self._idle if since <= due]
        if stale:
            self._idle = [(fairy, since) for fairy, since in self._idle if since > due]
            task = self._loop.create_task(_check_in(stale))
            self._returning.add(task)
            task.add_done_callback(self._returning.discard)
        if self._idle:
            self._loop.call_later(HOLD_S, self._sweep)
        else:
            self._sweeping = False

    def close(self) -> None:
        """Close every kept connection (the engine was disposed of, or their loop closed)."""
        idle, self._idle = self._idle, []
        for fairy, _ in idle:
            try:
                fairy.invalidate()
            except Exception:  # a driver that cannot close without its (closed) loop: the pool forgets it all the same
                log.debug("a kept connection could not be closed", exc_info=True)


async def _check_in(fairies: list[Any]) -> None:
    for fairy in fairies:
        if not fairy.is_valid:
            continue
        try:
            await greenlet_spawn(fairy._close_special, True)  # idle: no reset rollback needed
        except Exception:  # a connection that fails going back is closed; the others still go
            log.warning("a kept connection failed going back to the pool; closed instead", exc_info=True)
            if fairy.is_valid:
                fairy.invalidate()


_KEEPERS: weakref.WeakKeyDictionary[Engine, Keeper] = weakref.WeakKeyDictionary()


def keeper(engine: Engine) -> Keeper | None:
    """The keeper of the engine's pool; None for a pool that is not a QueuePool (NullPool, StaticPool: nothing
    to save, or a pool the caller chose not to share)."""
    root = _root(engine)
    kept = _KEEPERS.get(root)
    if kept is not None:
        return kept
    pool = root.pool
    if not isinstance(pool, QueuePool):
        return None
    kept = _KEEPERS[root] = Keeper(max(1, pool.size() // 2), asyncio.get_running_loop())
    event.listen(root, "engine_disposed", _closed)
    return kept


def _root(engine: Engine) -> Engine:
    """The engine that owns the pool: a bridge tenant's route is an engine.execution_options() copy (an
    OptionEngine, with its own events), and only the original's dispose() closes the pool."""
    while isinstance(proxied := getattr(engine, "_proxied", None), Engine):
        engine = proxied
    return engine


def _closed(engine: Engine) -> None:
    kept = _KEEPERS.pop(engine, None)
    if kept is not None:
        kept.close()

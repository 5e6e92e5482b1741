"""Group commit: concurrent calls with the same key share one database round trip.

A call whose key has nothing in flight runs alone at once (no added latency when quiet). Calls
that arrive while one is in flight queue, and go together in the next database call when it
returns (at most `max_batch` at a time). When that shared call fails with an error that
`did_nothing` recognises (the database refused and rolled back its one transaction), each of its
calls is run alone, so every caller gets exactly the outcome it would have had on its own. Any
other error (e.g. the connection lost: the outcome is unknown) reaches every caller of the group,
as it would have reached a caller on its own. A call run alone runs in its caller's context.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

I = TypeVar("I")  # noqa: E741 - an item
R = TypeVar("R")


class GroupCommit(Generic[I, R]):
    """Runs items one by one (run_one) or, when they pile up behind one in flight, together (run_many)."""

    def __init__(
        self,
        run_one: Callable[[I], Awaitable[R]],
        run_many: Callable[[Sequence[I]], Awaitable[Sequence[R]]],
        did_nothing: Callable[[Exception], bool],
        *,
        max_batch: int = 32,
    ) -> None:
        self._run_one = run_one
        self._run_many = run_many
        self._did_nothing = did_nothing
        self._max_batch = max_batch
        self._waiting: dict[Hashable, list[tuple[I, asyncio.Future[R], contextvars.Context]]] = {}
        self._flushes: set[asyncio.Task[None]] = set()

    async def submit(self, key: Hashable, item: I) -> R:
        """The outcome of item, run alone or with others of the same key."""
        waiting = self._waiting.get(key)
        if waiting is None:
            self._waiting[key] = []
            try:
                return await self._run_one(item)
            finally:
                self._next(key)
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        waiting.append((item, future, contextvars.copy_context()))
        return await future

    def _next(self, key: Hashable) -> None:
        """Start the next shared call for key, or mark the key quiet."""
        waiting = self._waiting[key]
        if not waiting:
            del self._waiting[key]
            return
        batch, self._waiting[key] = waiting[: self._max_batch], waiting[self._max_batch :]
        # In the first queued caller's context (the key names its tenant): the shared call's tenant.
        flush = asyncio.get_running_loop().create_task(self._flush(key, batch), context=batch[0][2].copy())
        self._flushes.add(flush)
        flush.add_done_callback(self._flushes.discard)

    async def _flush(self, key: Hashable, batch: list[tuple[I, asyncio.Future[R], contextvars.Context]]) -> None:
        try:
            if len(batch) == 1:
                await self._alone(*batch[0])
                return
            try:
                results = await self._run_many([item for item, _, _ in batch])
            except Exception as exc:  # noqa: BLE001 - handed to the callers, one way or the other
                if self._did_nothing(exc):  # each runs alone and meets its own outcome
                    await asyncio.gather(*(self._alone(*entry) for entry in batch))
                    return
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(exc)
                return
            for (_, future, _), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:
            for _, future, _ in batch:
                if not future.done():  # cancelled (the server stopping): the caller must not wait forever
                    future.cancel()
            self._next(key)

    async def _alone(self, item: I, future: asyncio.Future[R], context: contextvars.Context) -> None:
        """Run one item in its caller's context and hand its outcome over."""
        task: asyncio.Task[R] = asyncio.get_running_loop().create_task(self._one(item), context=context.copy())
        try:
            result = await task
        except Exception as exc:  # noqa: BLE001 - the caller's own error, raised to it
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(result)

    async def _one(self, item: I) -> R:
        return await self._run_one(item)

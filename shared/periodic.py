"""Background work that repeats: rotation, expiry sweeps, lease upkeep. One mechanism for every service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable


class Periodic:
    """Runs `work` every `interval` seconds until stop(); a failed pass is logged and the next one retries."""

    def __init__(
        self,
        name: str,
        work: Callable[[], Awaitable[object]],
        *,
        interval: float,
        log: logging.Logger,
        run_first: bool = False,
    ):
        self.name = name
        self._work = work
        self._interval = interval
        self._log = log
        self._run_first = run_first
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start in the background (a pass at once when run_first, else after one interval)."""
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=self.name)

    async def stop(self) -> None:
        """Cancel the loop and wait for it to end."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        if not self._run_first:
            await asyncio.sleep(self._interval)
        while True:
            try:
                await self._work()
            except Exception:  # noqa: BLE001 - keep going: one bad pass must not end the background work
                self._log.exception("%s: pass failed; the next one retries", self.name)
            await asyncio.sleep(self._interval)

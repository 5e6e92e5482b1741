"""Periodic: background passes that survive a failure and stop cleanly."""

from __future__ import annotations

import asyncio
import logging

from shared.periodic import Periodic


async def test_a_failing_pass_is_logged_and_the_next_one_runs(caplog):
    """The first pass raises; later passes still run; stop() ends the loop."""
    passes = []

    async def work():
        passes.append(len(passes))
        if len(passes) == 1:
            raise RuntimeError("first pass breaks")

    periodic = Periodic("test-work", work, interval=0.01, log=logging.getLogger("test.periodic"), run_first=True)
    periodic.start()
    while len(passes) < 3:
        await asyncio.sleep(0.01)
    await periodic.stop()
    count = len(passes)
    await asyncio.sleep(0.05)
    assert len(passes) == count  # nothing runs after stop()
    assert any("test-work: pass failed" in r.getMessage() for r in caplog.records)


async def test_without_run_first_the_first_pass_waits_one_interval():
    """A sweeper started with run_first=False does nothing before its first interval has passed."""
    passes = []

    async def work():
        passes.append(1)

    periodic = Periodic("later", work, interval=0.2, log=logging.getLogger("test.periodic"))
    periodic.start()
    await asyncio.sleep(0.05)
    assert passes == []
    await periodic.stop()

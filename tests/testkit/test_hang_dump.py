"""The hang dump names the await a stuck task is suspended in."""
from __future__ import annotations

import asyncio
import io

from testkit.hang_dump import dump_pending_tasks


async def test_a_pending_task_is_printed_with_the_line_it_waits_on():
    async def waits_for_ever_on_an_event():
        await asyncio.Event().wait()

    task = asyncio.create_task(waits_for_ever_on_an_event(), name="stuck-one")
    await asyncio.sleep(0)
    out = io.StringIO()
    try:
        assert dump_pending_tasks(out) >= 2  # this test's own task and the stuck one
    finally:
        task.cancel()
    text = out.getvalue()
    assert "stuck-one" in text and "waits_for_ever_on_an_event" in text and "await asyncio.Event().wait()" in text

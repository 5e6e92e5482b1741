"""The hang dump names the await a stuck task is suspended in."""

from __future__ import annotations

import asyncio
import contextlib
import io

from testkit.hang_dump import dump_pending_tasks


async def test_a_pending_task_is_printed_with_the_line_it_waits_on():
    async def waits_for_ever_on_an_event():
        await one_level_down()

    async def one_level_down():
        await asyncio.Event().wait()

    task = asyncio.create_task(waits_for_ever_on_an_event(), name="stuck-one")
    await asyncio.sleep(0)
    out = io.StringIO()
    try:
        assert dump_pending_tasks(out) >= 2  # this test's own task and the stuck one
    finally:
        task.cancel()
    text = out.getvalue()
    assert "stuck-one" in text and "waits_for_ever_on_an_event" in text
    # the chain goes down to the await that blocks, not just the task's own frame
    assert "in one_level_down" in text and "locks.py" in text and "in wait" in text


async def test_a_task_stuck_in_an_async_context_managers_exit_shows_the_generators_line():
    @contextlib.asynccontextmanager
    async def mesh_like():
        yield
        await asyncio.Event().wait()  # a teardown step that never ends

    async def body():
        async with mesh_like():
            pass

    task = asyncio.create_task(body(), name="stuck-in-exit")
    for _ in range(3):
        await asyncio.sleep(0)
    out = io.StringIO()
    try:
        dump_pending_tasks(out)
    finally:
        task.cancel()
    text = out.getvalue()
    assert "in __aexit__" in text and "in mesh_like" in text and "awaiting <Future pending" in text

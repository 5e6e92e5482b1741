"""pytest plugin: a test about to hit its pytest-timeout prints every pending asyncio task's stack.

pytest-timeout dumps the threads, and an async test's thread only shows the event loop waiting in
select(): the await that hangs is in a task. So shortly before the timeout fires, every task not
done prints where it is suspended (to stderr, shown with the failure)."""
from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Iterator

import pytest

MARGIN = 10.0
"""Seconds before the timeout at which the tasks are printed."""


def _timeout_of(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    try:
        return float(item.config.getini("timeout") or 0)
    except ValueError:
        return 0.0


def dump_pending_tasks(file=None) -> int:
    """Print the stack of every asyncio task not done, in any thread's loop; how many."""
    file = file or sys.stderr
    # asyncio.all_tasks() needs the loop; the registry behind it holds every loop's tasks.
    tasks = [t for t in list(asyncio.tasks._all_tasks) if not t.done()]  # noqa: SLF001
    print(f"\n+++ {len(tasks)} asyncio task(s) pending {MARGIN:.0f} s before the timeout +++", file=file)
    for task in tasks:
        print(f"--- {task.get_name()}: {task.get_coro()!r}", file=file)
        task.print_stack(limit=12, file=file)
    return len(tasks)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    timeout = _timeout_of(item)
    timer = None
    if timeout > 2 * MARGIN:
        timer = threading.Timer(timeout - MARGIN, dump_pending_tasks)
        timer.daemon = True
        timer.start()
    try:
        return (yield)
    finally:
        if timer is not None:
            timer.cancel()

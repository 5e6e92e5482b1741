"""pytest plugin: a test about to hit its pytest-timeout prints every pending asyncio task's stack.

pytest-timeout dumps the threads, and an async test's thread only shows the event loop waiting in
select(): the await that hangs is in a task. So shortly before the timeout fires, every task not
done prints where it is suspended (to stderr, shown with the failure)."""

from __future__ import annotations

import asyncio
import gc
import inspect
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


def await_chain(awaitable) -> list[str]:
    """Where a suspended coroutine waits: each frame down its chain of awaits, then what it awaits last.

    Task.print_stack() shows only the task's own frame; the await that hangs is usually deeper."""
    lines = []
    for _ in range(50):
        frame = next(
            (
                getattr(awaitable, a)
                for a in ("cr_frame", "gi_frame", "ag_frame")
                if getattr(awaitable, a, None) is not None
            ),
            None,
        )
        if frame is not None:
            lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        inner = next(
            (
                getattr(awaitable, a)
                for a in ("cr_await", "gi_yieldfrom", "ag_await")
                if getattr(awaitable, a, None) is not None
            ),
            None,
        )
        if inner is None and frame is None:
            # An async generator's asend(), a Future's iterator, a Cython coroutine: no frame of their
            # own, but the generator or future they drive is among their referents.
            inner = next(
                (
                    r
                    for r in gc.get_referents(awaitable)
                    if inspect.isasyncgen(r)
                    or inspect.iscoroutine(r)
                    or inspect.isgenerator(r)
                    or isinstance(r, asyncio.Future)
                ),
                None,
            )
            if inner is None or isinstance(inner, asyncio.Future):
                lines.append(f"  awaiting {inner if inner is not None else awaitable!r}"[:400])
                break
        elif inner is None:
            break
        awaitable = inner
    return lines


def dump_pending_tasks(file=None) -> int:
    """Print the await chain of every asyncio task not done, in any thread's loop (tests first); how many."""
    file = file or sys.stderr
    # asyncio.all_tasks() needs the loop; the registry behind it holds every loop's tasks.
    tasks = [t for t in list(asyncio.tasks._all_tasks) if not t.done()]  # type: ignore[attr-defined]
    tasks.sort(key=lambda t: "test_" not in getattr(t.get_coro(), "__qualname__", ""))
    print(f"\n+++ {len(tasks)} asyncio task(s) pending {MARGIN:.0f} s before the timeout +++", file=file)
    for task in tasks:
        try:
            print(f"--- {task.get_name()}: {getattr(task.get_coro(), '__qualname__', task.get_coro())}", file=file)
            print("\n".join(await_chain(task.get_coro())), file=file)
        except Exception as exc:  # noqa: BLE001 - a diagnostic must not stop at one odd task
            print(f"  (cannot walk it: {exc!r})", file=file)
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

"""Group commit (services/metering/group.py) on its own: who runs alone, who shares, who sees which error."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from services.metering.group import GroupCommit

WHO: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")


class Refused(Exception):
    """The shared call was refused whole (did nothing)."""


class Lost(Exception):
    """The shared call's outcome is unknown."""


class Db:
    """Records the calls; a gate holds the first call so others pile up behind it."""

    def __init__(self, *, many_fails: Exception | None = None):
        self.alone: list[tuple[int, str]] = []
        self.shared: list[list[int]] = []
        self.gate = asyncio.Event()
        self.many_fails = many_fails

    async def run_one(self, item: int) -> int:
        self.alone.append((item, WHO.get()))
        if len(self.alone) == 1:
            await self.gate.wait()
        if item < 0:
            raise ValueError(f"bad {item}")
        return item * 10

    async def run_many(self, items) -> list[int]:
        self.shared.append(list(items))
        await asyncio.sleep(0)
        if self.many_fails is not None:
            raise self.many_fails
        return [i * 10 for i in items]


def group(db: Db) -> GroupCommit[int, int]:
    return GroupCommit(db.run_one, db.run_many, lambda exc: isinstance(exc, Refused), max_batch=3)


async def _submit(g, key, item, who):
    WHO.set(who)
    return await g.submit(key, item)


async def _pile_up(db: Db, g, items, key="k"):
    """Submit the items, the first alone and held at the gate until the others queue; their outcomes."""
    tasks = [asyncio.create_task(_submit(g, key, i, f"caller{i}")) for i in items]
    for _ in range(5):
        await asyncio.sleep(0)
    db.gate.set()
    return await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_quiet_key_runs_alone_and_calls_queued_behind_it_share_in_batches():
    db = Db()
    g = group(db)
    assert await _pile_up(db, g, [1, 2, 3, 4, 5, 6]) == [10, 20, 30, 40, 50, 60]
    assert db.alone == [(1, "caller1")]
    assert db.shared == [[2, 3, 4], [5, 6]]  # at most max_batch a call, in arrival order
    assert await g.submit("k", 7) == 70 and db.alone[-1][0] == 7  # quiet again: alone


async def test_keys_do_not_share():
    db = Db()
    g = group(db)
    first = asyncio.create_task(_submit(g, "a", 1, "x"))
    await asyncio.sleep(0)
    other = asyncio.create_task(_submit(g, "b", 2, "y"))  # another key: alone at once, not queued behind "a"
    assert await other == 20
    db.gate.set()
    assert await first == 10
    assert db.shared == [] and [i for i, _ in db.alone] == [1, 2]


async def test_a_refused_shared_call_runs_each_alone_in_its_callers_context_with_its_own_outcome():
    db = Db(many_fails=Refused())
    g = group(db)
    out = await _pile_up(db, g, [1, 2, -3, 4])
    assert out[:2] == [10, 20] and out[3] == 40
    assert isinstance(out[2], ValueError) and str(out[2]) == "bad -3"  # only its own error
    assert db.shared == [[2, -3, 4]]
    assert sorted(db.alone[1:]) == [(-3, "caller-3"), (2, "caller2"), (4, "caller4")]


async def test_any_other_error_of_the_shared_call_reaches_all_its_callers_and_nothing_reruns():
    lost = Lost("connection lost")
    db = Db(many_fails=lost)
    g = group(db)
    out = await _pile_up(db, g, [1, 2, 3])
    assert out[0] == 10 and out[1] is lost and out[2] is lost
    assert db.alone == [(1, "caller1")]  # not run again: the shared call may have happened
    assert await g.submit("k", 9) == 90  # and the key is quiet again


async def test_the_first_callers_error_still_lets_the_queue_run():
    db = Db()
    g = group(db)
    out = await _pile_up(db, g, [-1, 2, 3])
    assert isinstance(out[0], ValueError) and out[1:] == [20, 30]


@pytest.mark.parametrize("size", [1, 2])
async def test_a_single_queued_call_runs_alone(size):
    db = Db()
    g = group(db)
    assert await _pile_up(db, g, list(range(1, size + 2))) == [10 * i for i in range(1, size + 2)]
    assert db.shared == ([] if size == 1 else [[2, 3]])

"""The write-ahead attempt journal: attempts are on disk before they go upstream; what a dead
process leaves is settled into the outbox (real usage when it was written, else the reservation)."""

from __future__ import annotations

import asyncio
import time

from bulkhead.inference.v1 import inference_pb2 as pb
from services.inference.attempts import DELIVERED, OPEN, AttemptJournal, context_json
from services.inference.budget import Tokens
from services.inference.store import SqlAttempts, SqlOutbox
from services.inference.usage import UsageEvent
from shared.db import Database
from shared.tenancy import TenantContext

from .helpers import fake_totals, params


async def _journal(db: Database, replica: str = "r1") -> AttemptJournal:
    journal = AttemptJournal(SqlAttempts(db), replica=replica, sweep_after=60)
    await journal.start()
    return journal


def _event(ctx: TenantContext, attempt, tokens: Tokens) -> UsageEvent:
    return UsageEvent(
        ctx.tenant_id,
        attempt.event_id,
        ctx.principal_id,
        "",
        "",
        "m",
        tokens,
        5,
        "success",
        time.time(),
        attempt=attempt.number,
    )


async def test_restarted_replica_settles_what_its_predecessor_left(journal_db):
    """Open rows become events at their reservation, settled rows keep their real usage, done rows are left."""
    db = journal_db
    ctx = TenantContext("t_a", "p", request_id="req-1")
    journal = await _journal(db)
    opened = [
        await journal.open(
            ctx, model="m", reserve=Tokens(10, 50), context=context_json(ctx, trace_id="", occurred_at=time.time())
        )
        for _ in range(3)
    ]
    assert [a.number for a in opened] == [1, 2, 3]
    assert [a.event_id for a in opened] == ["req-1", "req-1#2", "req-1#3"]
    journal.settle(opened[1], _event(ctx, opened[1], Tokens(7, 9)))
    journal.settle(opened[2], _event(ctx, opened[2], Tokens(3, 4)))
    journal.delivered([_event(ctx, opened[2], Tokens(3, 4))])
    await journal.flush()  # as a crash would leave it: no close()

    again = await _journal(db)  # same replica name, new process
    pending = await SqlOutbox(db).pending("t_a", 10)
    got = {e.idempotency_key: (e.tokens, e.at_reservation, e.attempt) for _, e in pending}
    assert got == {"req-1": (Tokens(10, 50), True, 1), "req-1#2": (Tokens(7, 9), False, 2)}
    states = [r[3] for r in await SqlAttempts(db).rows()]
    assert states == [DELIVERED] * 3
    # The request id keeps counting after recovery.
    assert (await again.open(ctx, model="m", reserve=Tokens(1, 1), context="{}")).number == 4
    await again.close()


async def test_one_group_numbers_each_request_id_and_defers_repeats(journal_db):
    """Opens written in one statement each get their own row and the next number of their request id;
    a request id twice in one group still gets 1 and 2 (the repeat goes in the next group)."""
    journal = await _journal(journal_db)
    ctxs = [TenantContext(t, "p", request_id=r) for t in ("t_a", "t_b") for r in ("x", "y", "x", "z")]
    opened = await asyncio.gather(
        *(journal.open(c, model="m", reserve=Tokens(i, 1), context="{}") for i, c in enumerate(ctxs))
    )
    assert [(a.tenant_id, a.request_id, a.number) for a in opened] == [
        (t, r, n) for t in ("t_a", "t_b") for r, n in (("x", 1), ("y", 1), ("x", 2), ("z", 1))
    ]
    rows = {r[0:3]: r[5] for r in await SqlAttempts(journal_db).rows()}
    assert rows == {(a.tenant_id, a.request_id, a.number): a.reserve.input for a in opened}
    assert len({a.row_id for a in opened}) == len(opened)
    await journal.close()


async def test_sweeper_of_another_replica_takes_only_old_rows(journal_db):
    """A live replica's fresh attempt is left alone; once older than sweep_after, another replica settles it."""
    db = journal_db
    ctx = TenantContext("t_a", "p", request_id="req-2")
    live = await _journal(db, "live")
    await live.open(ctx, model="m", reserve=Tokens(4, 6), context=context_json(ctx, trace_id="", occurred_at=1.0))
    other = AttemptJournal(SqlAttempts(db), replica="other", sweep_after=60)
    assert await other.sweep() == set()
    assert [r[3] for r in await SqlAttempts(db).rows()] == [OPEN]
    other._sweep_after = -1.0
    assert await other.sweep() == {"t_a"}
    ((_, event),) = await SqlOutbox(db).pending("t_a", 10)
    assert (event.tokens, event.at_reservation) == (Tokens(4, 6), True)
    await live.close()


async def test_request_id_retried_on_another_replica_is_metered_per_attempt(mesh):
    """Two replicas sharing the journal: the same request id sent to each reaches the upstream twice
    and is metered twice (req, req#2), each attempt as the upstream billed it."""
    second = await mesh.start_proxy()  # same database file as the first
    md = (*mesh.md("t_a"), ("x-request-id", "req-twice"))
    await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params("once here")), metadata=md)
    await second.stub.CreateMessage(pb.CreateMessageRequest(params=params("once here")), metadata=md)
    await mesh.settle()
    calls, fake_in, fake_out = fake_totals(mesh.fake, mesh.proxy.proxy.opaque_user_id("t_a"))
    ((_, events, metered_in, metered_out, _),) = await mesh.metered("t_a")
    assert (calls, events) == (2, 2) and (metered_in, metered_out) == (fake_in, fake_out)
    refs = [r.attempt_ref for r in mesh.fake.usage_log]
    assert len(set(refs)) == 2 and all(r.startswith("att_") for r in refs)
    rows = await SqlAttempts(mesh.proxy.db).rows()
    assert [(r[1], r[2]) for r in rows] == [("req-twice", 1), ("req-twice", 2)]

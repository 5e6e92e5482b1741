"""The dispatcher against a real queue (SQLite through shared.db), without the rest of the mesh."""

from __future__ import annotations

import asyncio
import os
import time

from services.orchestrator.dispatcher import Dispatcher, DispatchSettings, StepFeed
from services.orchestrator.grants import GrantSealer
from services.orchestrator.server import MIGRATIONS
from services.orchestrator.store import QueueRow, RunStore
from shared.db import Database


def _dispatcher(runs: RunStore, sealer: GrantSealer) -> Dispatcher:
    """A dispatcher with no engine (nothing executes), a 60 s lease and a quick look at the queue."""
    return Dispatcher(
        runs=runs,
        engine=None,
        ports_for=lambda: None,
        sealer=sealer,
        feed=StepFeed(),
        settings=DispatchSettings(lease_seconds=60, poll_seconds=0.05),
    )


async def _start_run(runs: RunStore, sealer: GrantSealer, lease=None):
    """A run of tenant t_a as StartRun writes it (queued, or leased with lease): (run, created, claim, place)."""
    from services.orchestrator.team import AgentSpec, TeamSpec
    from shared.tenancy import TenantContext, tenant_scope

    with tenant_scope(TenantContext(tenant_id="t_a", principal_id="p", scopes=frozenset({"*"}))):
        return await runs.start(
            team=TeamSpec(name="t", agents=(AgentSpec("a"),)),
            entry_agent="a",
            run_input="x",
            idempotency_key="",
            tenant_id="t_a",
            principal_id="p",
            tier="pooled",
            grant=sealer.seal("token", "r_x"),
            run_id="r_x",
            lease=lease,
        )


async def test_queue_entry_without_its_run_is_dropped_not_retried_forever(tmp_path):
    """An entry whose run was never written (a crash while queueing) leaves the queue at its first claim."""
    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'o.db'}", migrations=str(MIGRATIONS))
    runs, sealer = RunStore(db), GrantSealer(os.urandom(32))
    async with db.system_session() as s:
        s.add(
            QueueRow(
                run_id="r_orphan",
                tenant_id="t_a",
                principal_id="p",
                tier="bridge",
                state="queued",
                enqueued_at=time.time(),
                lease_owner=None,
                lease_expires=0.0,
                cancel_requested=False,
                grant=sealer.seal("token", "r_orphan"),
                traceparent="",
            )
        )
    dispatcher = _dispatcher(runs, sealer)
    dispatcher.start()
    try:
        async with asyncio.timeout(5):
            while (await runs.waiting(time.time()))[0] or (await runs.waiting(time.time()))[1]:
                await asyncio.sleep(0.05)
    finally:
        await dispatcher.stop()
        await db.close()


async def test_a_run_started_here_as_dispatching_stops_goes_back_to_the_queue(tmp_path):
    """StartRun took a slot and the run's lease, then the replica stopped dispatching: the lease is given back,
    so another replica starts the run (nothing executes it on the stopping one)."""
    from services.orchestrator.store import Lease

    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'o.db'}", migrations=str(MIGRATIONS))
    runs, sealer = RunStore(db), GrantSealer(os.urandom(32))
    dispatcher = _dispatcher(runs, sealer)
    dispatcher.start()
    try:
        await asyncio.sleep(0.1)  # a first look at the (empty) queue
        lease = dispatcher.lease_for_new_run("t_a")
        assert isinstance(lease, Lease)
        run, _, claim, _ = await _start_run(runs, sealer, lease)
        assert claim is not None
        assert (await runs.waiting(time.time()))[1] == {"t_a": 1}  # leased to this replica
        await dispatcher.stop()
        await dispatcher.adopt(claim, run)
        assert not dispatcher.executing(run.run_id)
        waiting, running = await runs.waiting(time.time())
        assert [w.run_id for w in waiting] == [run.run_id] and not running
    finally:
        await dispatcher.stop()
        await db.close()


async def test_a_tenant_holding_its_limit_here_gets_no_slot_for_a_new_run(tmp_path):
    """StartRun asks for no lease (no claim transaction) while the tenant's runs executing or being started here
    fill its limit: leases count across replicas, so the run could not start now anyway; others still get one."""
    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'o.db'}", migrations=str(MIGRATIONS))
    runs, sealer = RunStore(db), GrantSealer(os.urandom(32))
    dispatcher = Dispatcher(
        runs=runs,
        engine=None,
        ports_for=lambda: None,
        sealer=sealer,
        feed=StepFeed(),
        settings=DispatchSettings(runs_per_tenant=2, lease_seconds=60, poll_seconds=0.05),
    )
    dispatcher.start()
    try:
        await asyncio.sleep(0.1)  # a first look at the (empty) queue
        assert dispatcher.lease_for_new_run("t_a") is not None
        assert dispatcher.lease_for_new_run("t_a") is not None
        assert dispatcher.lease_for_new_run("t_a") is None
        assert dispatcher.lease_for_new_run("t_b") is not None
        dispatcher.unreserve("t_a")
        assert dispatcher.lease_for_new_run("t_a") is not None
    finally:
        await dispatcher.stop()
        await db.close()


async def test_a_run_meeting_an_unavailable_dependency_waits_longer_each_time_before_its_next_claim(tmp_path):
    """An outage of state, the proxy or credentials is not a loop of claims: the lease is kept, executing nothing,
    for a backoff that doubles (here 0.4 s, then 0.8 s), and once it runs out the run is claimed and tried again."""
    from shared.errors import Unavailable

    attempts: list[float] = []

    class DownstreamDown:
        async def execute(self, job, ports, **kw):
            attempts.append(time.monotonic())
            raise Unavailable("state did not answer")

    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'o.db'}", migrations=str(MIGRATIONS))
    runs, sealer = RunStore(db), GrantSealer(os.urandom(32))
    run, *_ = await _start_run(runs, sealer)
    dispatcher = Dispatcher(
        runs=runs,
        engine=DownstreamDown(),
        ports_for=lambda: None,
        sealer=sealer,
        feed=StepFeed(),
        settings=DispatchSettings(lease_seconds=60, poll_seconds=0.05, outage_backoff=(0.4, 30.0)),
    )
    dispatcher.start()
    try:
        async with asyncio.timeout(5):
            while len(attempts) < 1 or dispatcher.executing(run.run_id):
                await asyncio.sleep(0.02)
        async with db.system_session() as s:
            entry = await s.get(QueueRow, run.run_id)
            assert (entry.state, entry.lease_owner) == ("running", dispatcher.owner)
            assert entry.lease_expires > time.time() + 0.2  # held through the backoff, nothing executing it
        async with asyncio.timeout(5):
            while len(attempts) < 3:
                await asyncio.sleep(0.02)
        first_wait, second_wait = attempts[1] - attempts[0], attempts[2] - attempts[1]
        assert 0.4 <= first_wait < 0.8 and 0.8 <= second_wait < 1.6, (first_wait, second_wait)
    finally:
        await dispatcher.stop()
        await db.close()

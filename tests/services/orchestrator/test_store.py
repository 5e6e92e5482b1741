"""The run queue's leases through shared.db, for tenants of every tier on SQLite and on Postgres.

The queue is a platform table: whatever a tenant's tier puts its runs (shared tables, a schema,
a SQLite file or a database of its own), the queue entry must be where the dispatcher looks.
"""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select

from services.orchestrator.history import Finished
from services.orchestrator.runs import RunStatus
from services.orchestrator.server import MIGRATIONS
from services.orchestrator.steps import Step, StepKind
from services.orchestrator.store import Lease, QueueRow, RunStore
from services.orchestrator.team import AgentSpec, TeamSpec
from shared.db import Database
from shared.tenancy import TenantContext, tenant_scope
from testkit.dialects import DIALECTS, open_migrated

TEAM = TeamSpec(name="t", agents=(AgentSpec("a"),))
TIERS = ("pooled", "bridge", "silo")


@pytest.fixture(params=DIALECTS)
async def db(request, tmp_path):
    """The orchestrator's database on each backend, migrated."""
    database = await open_migrated(request, tmp_path, MIGRATIONS, "orch_store")
    yield database
    await database.close()


async def _tenant_queue_rows(db: Database) -> int:
    """Queue rows in the current tenant's own copy of the table (its schema, file or database)."""
    route = await db.route()
    async with route.bind.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(QueueRow.__table__))).scalar_one()


async def _create(
    runs: RunStore, tenant_id: str, tier: str, key: str, *, run_input: str = "x", with_claim: bool = False, **more
):
    """StartRun's write of a run of TEAM (entry agent "a") for `tenant_id` by principal "p" (RunStore.start):
    (run, created), and its claim too with with_claim."""
    run, created, claim, _ = await runs.start(
        team=TEAM,
        entry_agent="a",
        run_input=run_input,
        idempotency_key=key,
        tenant_id=tenant_id,
        principal_id="p",
        tier=tier,
        grant=b"g",
        **more,
    )
    return (run, created, claim) if with_claim else (run, created)


@pytest.mark.parametrize("tier", TIERS)
async def test_queue_entry_is_platform_wide_whatever_the_tier(db, tier):
    """A run of a bridge or silo tenant is queued where the dispatcher looks, and leaves it when it ends."""
    runs = RunStore(db)
    tid = f"t_{tier}_{uuid.uuid4().hex[:6]}"
    ctx = TenantContext(tenant_id=tid, principal_id="p", scopes=frozenset({"*"}), tier=tier)
    with tenant_scope(ctx):
        run, created = await _create(runs, tid, tier, "k")
        again, created_again = await _create(runs, tid, tier, "k")
        if tier != "pooled":  # the tenant's own copy of the platform table is never written
            assert await _tenant_queue_rows(db) == 0
    assert created and not created_again and again.run_id == run.run_id
    waiting, _ = await runs.waiting(now=100)
    assert [(w.tenant_id, w.run_id) for w in waiting] == [(tid, run.run_id)]
    claim = await runs.claim(run.run_id, "one", ttl=10, now=100)
    assert claim is not None and (claim.tenant_id, claim.tier) == (tid, tier)
    with tenant_scope(ctx):
        await runs.update(run.run_id, status=RunStatus.RUNNING)
        assert (await runs.cancel(run.run_id)).status == RunStatus.RUNNING
    assert await runs.renew(run.run_id, "one", ttl=10, now=101) == "cancel"  # the flag reached the platform row
    with tenant_scope(ctx):
        await runs.record_steps(
            run.run_id, [Step(1, StepKind.RUN_FINISHED, "a")], current_agent="a", finished=Finished(status="cancelled")
        )
    assert await runs.renew(run.run_id, "one", ttl=10, now=102) == "gone"
    assert await runs.waiting(now=102) == ([], {})

    # A queued run cancelled before it starts leaves the queue too.
    with tenant_scope(ctx):
        queued, _ = await _create(runs, tid, tier, "", run_input="y")
        assert (await runs.cancel(queued.run_id)).status == RunStatus.CANCELLED
    assert await runs.waiting(now=103) == ([], {})


async def test_lease_claim_expiry_takeover_and_finish(tmp_path):
    """One holder at a time; an expired lease is taken over; the old holder learns it lost; a finished run is gone."""
    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'o.db'}", migrations=str(MIGRATIONS))
    runs = RunStore(db)
    ctx = TenantContext(tenant_id="t_a", principal_id="p", scopes=frozenset({"*"}))
    with tenant_scope(ctx):
        run, created = await _create(runs, "t_a", "pooled", "")
    assert created
    assert await runs.claim(run.run_id, "one", ttl=10, now=100) is not None
    assert await runs.claim(run.run_id, "two", ttl=10, now=105) is None  # still held
    waiting, running = await runs.waiting(now=105)
    assert waiting == [] and running == {"t_a": 1}
    assert await runs.renew(run.run_id, "one", ttl=10, now=106) == "ok"
    assert await runs.claim(run.run_id, "two", ttl=10, now=117) is not None  # expired: taken over
    assert await runs.renew(run.run_id, "one", ttl=10, now=118) == "lost"
    with tenant_scope(ctx):
        await runs.update(run.run_id, status=RunStatus.RUNNING)
        assert (await runs.cancel(run.run_id)).status == RunStatus.RUNNING  # running: flagged, not stopped
    assert await runs.renew(run.run_id, "two", ttl=10, now=118) == "cancel"
    with tenant_scope(ctx):
        done = await runs.record_steps(
            run.run_id, [Step(1, StepKind.RUN_FINISHED, "a")], current_agent="a", finished=Finished(status="cancelled")
        )
    assert done.status == RunStatus.CANCELLED
    assert await runs.renew(run.run_id, "two", ttl=10, now=119) == "gone"
    # Tenant-owned rows stay invisible to other tenants, even by id.
    with tenant_scope(TenantContext(tenant_id="t_b", principal_id="p")):
        assert await runs.steps(run.run_id) == []
    await db.close()


async def test_retry_with_the_same_key_requeues_a_run_that_lost_its_entry(tmp_path):
    """A crash between writing a run and queueing it is healed by the client's retry with the same key."""
    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'o.db'}", migrations=str(MIGRATIONS))
    runs = RunStore(db)
    ctx = TenantContext(tenant_id="t_a", principal_id="p", scopes=frozenset({"*"}), tier="silo")
    with tenant_scope(ctx):
        run, _ = await _create(runs, "t_a", "silo", "k")
    await runs.drop(run.run_id)  # as if the process died before the queue entry was written
    assert await runs.waiting(now=100) == ([], {})
    with tenant_scope(ctx):
        again, created = await _create(runs, "t_a", "silo", "k")
    assert not created and again.run_id == run.run_id
    assert [w.run_id for w in (await runs.waiting(now=100))[0]] == [run.run_id]
    await db.close()


async def test_a_run_that_cannot_be_queued_fails_instead_of_waiting(tmp_path, monkeypatch):
    """When the queue entry cannot be written, the run is marked failed (NOT_QUEUED), not left queued forever."""
    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'o.db'}", migrations=str(MIGRATIONS))
    runs = RunStore(db)

    async def platform_database_away(*args, **kwargs):
        raise ConnectionError("platform database away")

    monkeypatch.setattr(runs, "_enqueue", platform_database_away)
    with tenant_scope(TenantContext(tenant_id="t_a", principal_id="p", tier="bridge")):
        with pytest.raises(ConnectionError):
            await _create(runs, "t_a", "bridge", "", run_id="r_lost")
        failed = await runs.get("r_lost")
    assert failed.status == RunStatus.FAILED and failed.error_reason == "NOT_QUEUED"
    await db.close()


async def test_a_concurrent_retry_queueing_the_run_first_leaves_it_queued(tmp_path, monkeypatch):
    """Two StartRuns with one key: when the retry queues the new run before its creator does, the creator's
    queue insert hits the entry that is already there, and the run stays queued (it used to fail NOT_QUEUED)."""
    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'o.db'}", migrations=str(MIGRATIONS))
    runs = RunStore(db)
    enqueue = runs._enqueue

    async def retry_won_the_race(run_id, now, entry):
        await enqueue(run_id, now, entry)  # the concurrent retry's entry, written between our check and insert
        async with db.system_session() as s:
            s.add(
                QueueRow(
                    run_id=run_id,
                    state="queued",
                    enqueued_at=now,
                    lease_owner=None,
                    lease_expires=0.0,
                    cancel_requested=False,
                    **entry,
                )
            )

    monkeypatch.setattr(runs, "_enqueue", retry_won_the_race)
    with tenant_scope(TenantContext(tenant_id="t_a", principal_id="p", tier="pooled")):
        run, created = await _create(runs, "t_a", "pooled", "k")
        assert created and (await runs.get(run.run_id)).status == RunStatus.QUEUED
    assert [w.run_id for w in (await runs.waiting(now=100))[0]] == [run.run_id]
    await db.close()


async def test_renew_many_renews_only_the_named_runs_of_the_owner(db):
    """One transaction renews the leases of the runs named; each learns ok, cancel, gone or lost like renew()."""
    runs = RunStore(db)
    ctx = TenantContext(tenant_id=f"t_{uuid.uuid4().hex[:6]}", principal_id="p", scopes=frozenset({"*"}))
    with tenant_scope(ctx):
        made = [(await _create(runs, ctx.tenant_id, "pooled", ""))[0].run_id for _ in range(4)]
    ok, flagged, taken, leftover = made
    for run_id in made:
        assert await runs.claim(run_id, "one", ttl=10, now=100) is not None
    with tenant_scope(ctx):
        await runs.update(flagged, status=RunStatus.RUNNING)
        await runs.cancel(flagged)
    assert await runs.claim(taken, "two", ttl=10, now=111) is not None  # expired: another replica took it
    outcomes = await runs.renew_many([ok, flagged, taken, "r_gone"], "one", ttl=10, now=111)
    assert outcomes == {ok: "ok", flagged: "cancel", taken: "lost", "r_gone": "gone"}
    # The named runs of "one" hold their lease again; "leftover" (not named) was not renewed.
    assert await runs.claim(ok, "two", ttl=10, now=115) is None
    assert await runs.claim(taken, "one", ttl=10, now=115) is None
    assert await runs.claim(leftover, "two", ttl=10, now=115) is not None


@pytest.mark.parametrize("tier", TIERS)
async def test_start_with_a_lease_starts_the_run_at_once_unless_it_must_wait(db, tier):
    """A run started with a replica's lease is written RUNNING with its entry leased to that replica when fair
    admission would pick it now; at the tenant's limit (or behind an older run) it is queued as without one."""
    runs = RunStore(db)
    tid = f"t_{tier}_{uuid.uuid4().hex[:6]}"
    ctx = TenantContext(tenant_id=tid, principal_id="p", scopes=frozenset({"*"}), tier=tier)
    lease = Lease("one", ttl=60, per_tenant_limit=1, free_slots=4)
    with tenant_scope(ctx):
        first, created, claim = await _create(runs, tid, tier, "k1", lease=lease, with_claim=True)
        assert created and claim is not None
        assert (claim.run_id, claim.tenant_id, claim.tier) == (first.run_id, tid, tier)
        assert first.status == RunStatus.RUNNING
        assert (await runs.get(first.run_id)).status == RunStatus.RUNNING
        # The same key again: the same run, no second claim.
        again, created, claim = await _create(runs, tid, tier, "k1", lease=lease, with_claim=True)
        assert (again.run_id, created, claim) == (first.run_id, False, None)
        # At the tenant's limit (1): queued, not leased.
        second, created, claim = await _create(runs, tid, tier, "k2", lease=lease, with_claim=True)
        assert created and claim is None and second.status == RunStatus.QUEUED
    now = first.created_at + 1
    waiting, running = await runs.waiting(now=now)
    assert [w.run_id for w in waiting] == [second.run_id] and running == {tid: 1}
    assert await runs.claim(first.run_id, "two", ttl=10, now=now) is None  # held by "one"

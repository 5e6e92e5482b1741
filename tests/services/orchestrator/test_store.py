"""The run queue's leases, on SQLite through shared.db (Postgres is covered in test_postgres)."""
from __future__ import annotations

from services.orchestrator.history import Finished
from services.orchestrator.runs import RunStatus
from services.orchestrator.server import MIGRATIONS
from services.orchestrator.steps import Step, StepKind
from services.orchestrator.store import RunStore
from services.orchestrator.team import AgentSpec, TeamSpec
from shared.db import Database
from shared.tenancy import TenantContext, tenant_scope

TEAM = TeamSpec(name="t", agents=(AgentSpec("a"),))


async def test_lease_claim_expiry_takeover_and_finish(tmp_path):
    """One holder at a time; an expired lease is taken over; the old holder learns it lost; a finished run is gone."""
    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'o.db'}", migrations=str(MIGRATIONS))
    runs = RunStore(db)
    ctx = TenantContext(tenant_id="t_a", principal_id="p", scopes=frozenset({"*"}))
    with tenant_scope(ctx):
        run, created = await runs.create(team=TEAM, entry_agent="a", run_input="x", idempotency_key="", tenant_id="t_a",
                                          principal_id="p", tier="pooled", grant=b"g")
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
        done = await runs.record_steps(run.run_id, [Step(1, StepKind.RUN_FINISHED, "a")], current_agent="a",
                                       finished=Finished(status="cancelled"))
    assert done.status == RunStatus.CANCELLED
    assert await runs.renew(run.run_id, "two", ttl=10, now=119) == "gone"
    # Tenant-owned rows stay invisible to other tenants, even by id.
    with tenant_scope(TenantContext(tenant_id="t_b", principal_id="p")):
        assert await runs.steps(run.run_id) == []
    await db.close()

"""Fair admission of queued runs."""

from __future__ import annotations

from services.orchestrator.scheduler import QueuedRun, pick_runs


def q(tenant: str, n: int, t0: float = 0.0) -> list[QueuedRun]:
    return [QueuedRun(tenant, f"{tenant}-{i}", t0 + i) for i in range(n)]


def test_tenant_at_limit_queues_while_other_proceeds():
    """A's queue is long and A is at its limit; only B's run is started."""
    picked = pick_runs(q("A", 10) + q("B", 1, t0=100), {"A": 2}, per_tenant_limit=2, free_slots=5)
    assert [p.run_id for p in picked] == ["B-0"]


def test_slots_alternate_between_tenants_not_by_arrival():
    """A queued 10 runs first, B one later: B still gets the second slot."""
    picked = pick_runs(q("A", 10) + q("B", 3, t0=100), {}, per_tenant_limit=5, free_slots=4)
    assert [p.run_id for p in picked] == ["A-0", "B-0", "A-1", "B-1"]


def test_fifo_within_a_tenant_and_global_slots_respected():
    """Runs of one tenant start in queue order, never more than free_slots."""
    picked = pick_runs(q("A", 5), {}, per_tenant_limit=10, free_slots=3)
    assert [p.run_id for p in picked] == ["A-0", "A-1", "A-2"]
    assert pick_runs(q("A", 5), {}, per_tenant_limit=10, free_slots=0) == []

"""identity's migration feed (services.identity.migration.migration_feed, published with ListRevokedTokens):
which tenants it pauses and which placements it carries, by the state of each tenant's migration; a
migration that ended longer ago than the longest token lifetime drops out (every live token claims the
tenant's tier by then), so the list every replica polls each second stays small."""
from __future__ import annotations

from datetime import timedelta

from bulkhead.common.v1 import tenancy_pb2
from bulkhead.identity.v1 import identity_pb2 as pb
from services.identity.migration import SERVICES, migration_feed
from services.identity.signing import MAX_TOKEN_TTL, utcnow
from services.identity.store import MigrationRow, MigrationStepRow, TenantRow


async def _plan(db, tenant_id: str, state: str, phases: list[str], *, generation: int = 0, tier: str = "bridge",
                ended_ago: float | None = None) -> None:
    async with db.system_session() as s:
        tenant = await s.get(TenantRow, tenant_id)
        tenant.tier = tier
        s.add(MigrationRow(tenant_id=tenant_id, source_tier="pooled", target_tier="bridge", state=state,
                           generation=generation, requested_at=utcnow(), pause_ms=0, last_error="",
                           completed_at=None if ended_ago is None else utcnow() - timedelta(seconds=ended_ago)))
        s.add_all(MigrationStepRow(tenant_id=tenant_id, service=svc, position=i, phase=phase, attempts=0,
                                   last_error="") for i, (svc, phase) in enumerate(zip(SERVICES, phases, strict=True)))


async def test_pauses_and_placements_by_migration_state(sqlite_identity):
    db = sqlite_identity.app.db
    ids = {}
    for name in ("copying", "switching", "switched", "recent", "old", "never"):
        ids[name] = (await sqlite_identity.tenant(f"feed-{name}", tier=tenancy_pb2.TIER_POOLED)).tenant_id
    await _plan(db, ids["copying"], "copying", ["copied", "pending", "pending", "pending", "pending"], tier="pooled")
    await _plan(db, ids["switching"], "releasing", ["switched", "switched", "copied", "copied", "copied"],
                generation=1)
    await _plan(db, ids["switched"], "releasing", ["switched"] * 5, generation=2)
    await _plan(db, ids["recent"], "done", ["released"] * 5, generation=3, ended_ago=60)
    await _plan(db, ids["old"], "done", ["released"] * 5, generation=4, ended_ago=MAX_TOKEN_TTL + 120)

    paused, placements, regions = await migration_feed(db)
    assert set(regions) == set(placements) and len(set(regions.values())) == 1  # every tenant's region, published
    assert paused == {ids["copying"], ids["switching"]}
    assert placements == {ids["copying"]: ("pooled", 0), ids["switching"]: ("bridge", 1),
                          ids["switched"]: ("bridge", 2), ids["recent"]: ("bridge", 3)}

    listed = await sqlite_identity.stub.ListRevokedTokens(
        pb.ListRevokedTokensRequest(), metadata=(await sqlite_identity.login(
            sqlite_identity.service_key_file("state").read_text().strip())).metadata)
    assert set(listed.migrating_tenant_ids) == paused
    assert {p.tenant_id: p.region for p in listed.placements} == regions
    assert {p.tenant_id: (p.tier, p.generation) for p in listed.placements} == {
        t: ({"pooled": tenancy_pb2.TIER_POOLED, "bridge": tenancy_pb2.TIER_BRIDGE}[tier], g) for t, (tier, g) in placements.items()}

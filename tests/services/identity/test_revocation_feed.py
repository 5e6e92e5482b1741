"""ListRevokedTokens (read without the ORM, in one transaction, every second by every service) on SQLite and on
Postgres: revocations after a revision with their expiry, the refused tenants (suspended, deleting, deleted
within the longest token lifetime), and the migration feed's pauses and placements."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest

from bulkhead.common.v1 import tenancy_pb2
from bulkhead.identity.v1 import identity_pb2 as pb
from services.identity.migration import migration_feed
from services.identity.signing import MAX_TOKEN_TTL, revocations_since, suspended_tenants, utcnow
from services.identity.store import DeletionRow, TenantRow
from tests.services.identity.test_migration_feed import _plan


async def _feed(identity, since: int = 0) -> pb.ListRevokedTokensResponse:
    service = await identity.login(identity.service_key_file("state").read_text().strip())
    return await identity.stub.ListRevokedTokens(
        pb.ListRevokedTokensRequest(since_revision=since), metadata=service.metadata
    )


async def _status(identity, tenant_id: str, status: str, *, deleted_ago: float | None = None) -> None:
    async with identity.app.db.system_session() as s:
        (await s.get(TenantRow, tenant_id)).status = status
        if deleted_ago is not None:
            s.add(
                DeletionRow(
                    tenant_id=tenant_id,
                    tier="pooled",
                    state="done",
                    requested_at=utcnow(),
                    delete_after=utcnow(),
                    completed_at=utcnow() - timedelta(seconds=deleted_ago),
                )
            )


async def test_revocations_after_a_revision_with_their_expiry(identity):
    """Each revocation once, after the revision a poller last saw; the revision is kept when none is new."""
    a = await identity.tenant()
    exchanged = await identity.stub.ExchangeToken(pb.ExchangeTokenRequest(scopes=["state.*"]), metadata=a.metadata)
    first = await identity.stub.RevokeToken(pb.RevokeTokenRequest(jti=exchanged.jti), metadata=a.metadata)
    listed = await _feed(identity)
    assert {r.jti: r.expire_time for r in listed.revoked} == {exchanged.jti: exchanged.expire_time}
    assert first.revoked.expire_time == exchanged.expire_time
    await identity.stub.RevokeToken(pb.RevokeTokenRequest(jti=a.jti), metadata=a.metadata)
    later = await _feed(identity, listed.revision)
    assert [r.jti for r in later.revoked] == [a.jti] and later.revision > listed.revision
    unchanged = await _feed(identity, later.revision)
    assert (list(unchanged.revoked), unchanged.revision) == ([], later.revision)
    assert await revocations_since(identity.app.db, listed.revision) == (
        later.revision,
        {a.jti: later.revoked[0].expire_time.seconds},
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _feed(identity, -1)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_refused_tenants_and_the_migration_feed(identity):
    """Suspended, deleting and recently deleted tenants are listed (not long-deleted or active ones), and the
    migration feed publishes pauses and placements as migration_feed() computes them."""
    t = {name: (await identity.tenant()).tenant_id for name in ("active", "suspended", "deleting", "recent", "old")}
    await _status(identity, t["suspended"], "suspended")
    await _status(identity, t["deleting"], "deleting")
    await _status(identity, t["recent"], "deleted", deleted_ago=600)
    await _status(identity, t["old"], "deleted", deleted_ago=MAX_TOKEN_TTL + 600)
    db = identity.app.db
    m = {name: (await identity.tenant()).tenant_id for name in ("copying", "switching", "ended", "ended_long_ago")}
    await _plan(db, m["copying"], "copying", ["copied", "pending", "pending", "pending", "pending"], tier="pooled")
    await _plan(db, m["switching"], "releasing", ["switched", "switched", "copied", "copied", "copied"], generation=1)
    await _plan(db, m["ended"], "done", ["released"] * 5, generation=3, ended_ago=60)
    await _plan(db, m["ended_long_ago"], "done", ["released"] * 5, generation=4, ended_ago=MAX_TOKEN_TTL + 120)

    listed = await _feed(identity)
    refused = {t["suspended"], t["deleting"], t["recent"]}
    assert set(listed.suspended_tenant_ids) == refused == await suspended_tenants(db)
    assert set(listed.migrating_tenant_ids) == {m["copying"], m["switching"]}
    tiers = {tenancy_pb2.TIER_POOLED: "pooled", tenancy_pb2.TIER_BRIDGE: "bridge"}
    published = {p.tenant_id: (tiers[p.tier], p.generation, p.region) for p in listed.placements}
    assert published == {
        m["copying"]: ("pooled", 0, "local"),
        m["switching"]: ("bridge", 1, "local"),
        m["ended"]: ("bridge", 3, "local"),
    }
    paused, placements, regions = await migration_feed(db)
    assert paused == set(listed.migrating_tenant_ids)
    assert {tid: (*placements[tid], regions[tid]) for tid in placements} == published

"""ExchangeToken's issuance record (written without the ORM, on every agent run): the same row the ORM wrote,
for pooled, bridge and silo tenants, on SQLite and on Postgres under RLS; revocable by its tenant only."""

from __future__ import annotations

from datetime import UTC

import grpc
import jwt
import pytest
from sqlalchemy import select

from bulkhead.common.v1 import tenancy_pb2
from bulkhead.identity.v1 import identity_pb2 as pb
from services.identity.directory import acting_as
from services.identity.signing import as_utc
from services.identity.store import IssuedTokenRow
from shared.tenancy import tenant_scope

TIERS = [tenancy_pb2.TIER_POOLED, tenancy_pb2.TIER_BRIDGE, tenancy_pb2.TIER_SILO]


async def _rows(identity, tenant_id: str) -> dict[str, IssuedTokenRow]:
    """The tenant's issued-token rows by jti, read through the ORM as RevokeToken reads them."""
    with tenant_scope(acting_as(tenant_id)):
        async with identity.app.db.session() as s:
            return {r.jti: r for r in (await s.execute(select(IssuedTokenRow))).scalars()}


@pytest.mark.parametrize("tier", TIERS, ids=["pooled", "bridge", "silo"])
async def test_exchange_records_the_token_under_the_callers_tenant(identity, tier):
    """The row names the exchanged token's jti, subject and expiry, under the caller's tenant only."""
    a, b = await identity.tenant(tier=tier), await identity.tenant()
    caller = jwt.decode(a.token, options={"verify_signature": False})
    agent = await identity.stub.ExchangeToken(
        pb.ExchangeTokenRequest(scopes=["state.*"], agent_id="triage", run_id="r_1", ttl_seconds=120),
        metadata=a.metadata,
    )
    plain = await identity.stub.ExchangeToken(pb.ExchangeTokenRequest(scopes=["state.*"]), metadata=a.metadata)
    rows = await _rows(identity, a.tenant_id)
    for resp, subject in ((agent, "agent:triage"), (plain, caller["sub"])):
        row = rows[resp.jti]
        assert (row.tenant_id, row.principal_id) == (a.tenant_id, subject)
        assert as_utc(row.expires_at) == resp.expire_time.ToDatetime(UTC) and row.revoked_at is None
        assert jwt.decode(resp.token, options={"verify_signature": False})["jti"] == resp.jti
    assert rows.keys() == {a.jti, agent.jti, plain.jti}  # IssueToken's row and the two exchanged ones
    assert not {agent.jti, plain.jti} & (await _rows(identity, b.tenant_id)).keys()


@pytest.mark.parametrize("tier", TIERS, ids=["pooled", "bridge", "silo"])
async def test_an_exchanged_token_is_revocable_by_its_tenant_only(identity, tier):
    """Another tenant's RevokeToken of the jti: NOT_FOUND (no existence leak); its own tenant's revokes it."""
    a, b = await identity.tenant(tier=tier), await identity.tenant()
    resp = await identity.stub.ExchangeToken(
        pb.ExchangeTokenRequest(scopes=["identity.tenants.read"], agent_id="x"), metadata=a.metadata
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await identity.stub.RevokeToken(pb.RevokeTokenRequest(jti=resp.jti), metadata=b.metadata)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    revoked = await identity.stub.RevokeToken(pb.RevokeTokenRequest(jti=resp.jti), metadata=a.metadata)
    assert revoked.revoked.jti == resp.jti and revoked.revoked.expire_time == resp.expire_time
    row = (await _rows(identity, a.tenant_id))[resp.jti]
    assert row.revoked_at is not None

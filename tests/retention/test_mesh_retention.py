"""Retention end to end on the mesh (SQLite, embedded defaults): the operator sets a tenant's retention
with the CLI, the tenant reads it, the orchestrator's sweeper (policies from identity with its platform
key) prunes that tenant's old configuration events only, and `bulkhead audit verify` passes from the
anchor, says how many were pruned, and still fails on a kept event removed afterwards. Pooled, bridge, silo."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import pytest_asyncio

from bulkhead.common.v1 import audit_pb2 as apb
from bulkhead.common.v1 import audit_pb2_grpc
from bulkhead.identity.v1 import identity_pb2 as idn
from bulkhead.orchestrator.v1 import orchestrator_pb2 as opb
from shared.client import make_channel
from shared.config_audit import ConfigAudit
from shared.db.raw import raw_transaction
from shared.keys import ServiceKeyCredentials
from shared.retention import IdentityRetention, RetentionSweeper
from testkit.fake_anthropic import FakeAnthropic
from testkit.identity import TenantHandle
from tests.retention.test_config_audit_retention import _backdate
from tests.services.orchestrator.mesh import running_mesh, team_pb

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(tmp_path_factory):
    async with (
        FakeAnthropic() as upstream,
        running_mesh(tmp_path_factory.mktemp("ret"), upstream_url=upstream.base_url) as m,
    ):
        yield m


@pytest.fixture
def cli(mesh, monkeypatch, capsys):
    env = {
        "BULKHEAD_IDENTITY_ADDR": mesh.identity.address,
        "BULKHEAD_ORCHESTRATOR_ADDR": mesh.orchestrator.address,
        **{f"BULKHEAD_{s.upper()}_ADDR": mesh.addr(s) for s in ("credentials", "metering", "inference")},
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("BULKHEAD_API_KEY", raising=False)

    async def run(who: TenantHandle, *argv: str) -> tuple[int, str, str]:
        from bulkhead_cli import main

        monkeypatch.setenv("BULKHEAD_TOKEN", who.token)
        monkeypatch.setenv("BULKHEAD_TENANT", who.tenant_id)
        try:
            code = await asyncio.to_thread(main, list(argv))
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


class _Ctx:
    def __init__(self, tenant_id: str, tier: str) -> None:
        self.tenant_id, self.tier = tenant_id, tier


@pytest.mark.parametrize("tier", ["pooled", "bridge", "silo"])
async def test_operator_sets_short_retention_sweeper_prunes_verify_passes_and_catches_a_removed_event(mesh, cli, tier):
    op = mesh.identity.operator
    short, keep = await mesh.tenant(tier), await mesh.tenant(tier)
    name = (await mesh.identity.stub.GetTenant(idn.GetTenantRequest(), metadata=short.metadata)).tenant.name
    code, out, err = await cli(op, "tenants", "retention", name, "--audit-days", "1", "--usage-days", "2555")
    assert code == 0, err
    assert short.tenant_id in out and "2555" in out
    code, out, err = await cli(short, "tenants", "retention")  # the tenant reads its own
    assert code == 0 and " 1 " in f" {out} " and "2555" in out, out
    code, _, err = await cli(short, "tenants", "retention", keep.tenant_id, "--audit-days", "5")
    assert code != 0  # setting is the operator's
    code, out, err = await cli(op, "tenants", "list")
    row = next(line for line in out.splitlines() if short.tenant_id in line)
    assert (
        code == 0
        and "1d / 2555d" in row
        and "2557d / 400d" in next(line for line in out.splitlines() if keep.tenant_id in line)
    ), out

    for who in (short, keep):
        for _ in range(6):
            await mesh.stub.CreateTeam(
                opb.CreateTeamRequest(team=team_pb(f"t{uuid.uuid4().hex[:8]}")), metadata=who.metadata
            )
    audit = ConfigAudit("orchestrator", mesh.orchestrator.db)
    for who in (short, keep):
        await _backdate(audit, _Ctx(who.tenant_id, tier), 3, days=3)

    channel = make_channel(mesh.identity.address, tls=None)
    try:
        source = IdentityRetention(
            channel, ServiceKeyCredentials(channel, mesh.identity.service_key_file("orchestrator"))
        )
        sweeper = RetentionSweeper("orchestrator", source.policies, [audit.prune])
        assert await sweeper.run_once() == 3  # only short's three old events; keep's 7-year default keeps them
        assert await sweeper.run_once() == 0
    finally:
        await channel.close()

    stub = audit_pb2_grpc.ConfigAuditServiceStub(mesh.channels[-1])  # the orchestrator's
    listed = await stub.ListAuditEvents(apb.ListAuditEventsRequest(oldest_first=True), metadata=short.metadata)
    assert [e.sequence for e in listed.events] == [4, 5, 6] and listed.anchor.sequence == 3
    assert listed.anchor.hash == listed.events[0].prev_hash
    theirs = await stub.ListAuditEvents(apb.ListAuditEventsRequest(oldest_first=True), metadata=keep.metadata)
    assert [e.sequence for e in theirs.events] == [1, 2, 3, 4, 5, 6] and theirs.anchor.sequence == 0

    code, out, err = await cli(short, "audit", "verify")
    assert code == 0, err
    row = next(line for line in out.splitlines() if "orchestrator" in line)
    assert "verified from event 4, 3 pruned by retention" in row, out
    assert "pruned by retention" in out.splitlines()[-1] or "pruned by retention" in out
    code, out, err = await cli(keep, "audit", "verify")
    assert code == 0 and "pruned by retention" not in out, out

    route = await mesh.orchestrator.db.router.existing(short.tenant_id, tier)
    async with raw_transaction(route.bind, tenant_id=short.tenant_id, schema=route.schema, write=True) as tx:
        assert (
            await tx.execute(
                "DELETE FROM orchestrator_config_audit_events WHERE tenant_id = $1 AND seq = 5", short.tenant_id
            )
            == 1
        )
    code, out, err = await cli(short, "audit", "verify")
    assert code == 1 and "BROKEN at event 5 in orchestrator" in err, (out, err)
    code, out, err = await cli(op, "audit", "verify", "--tenant", short.tenant_id)
    assert code == 1 and "BROKEN at event 5 in orchestrator" in err

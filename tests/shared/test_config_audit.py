"""The configuration audit over the real mesh: every configuration change appends exactly one event to
the chain of the tenant it changed (operators' changes with the operator as actor), for pooled, bridge
and silo tenants; no secret in any event; a tenant reads only its own chain; tampering with the stored
chain (a changed field, a removed event) is caught by VerifyAuditEvents and by `bulkhead audit verify`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from bulkhead.common.v1 import audit_pb2 as apb
from bulkhead.common.v1 import audit_pb2_grpc
from bulkhead.identity.v1 import identity_pb2 as idn
from bulkhead.inference.v1 import inference_pb2 as ipb
from bulkhead.inference.v1 import inference_pb2_grpc
from bulkhead.metering.v1 import metering_pb2 as mpb
from bulkhead.metering.v1 import metering_pb2_grpc
from bulkhead.orchestrator.v1 import orchestrator_pb2 as opb
from shared.errors import error_details
from testkit.fake_anthropic import FakeAnthropic
from testkit.identity import TenantHandle
from tests.services.orchestrator.mesh import Mesh, running_mesh, team_pb

pytestmark = pytest.mark.asyncio(loop_scope="module")

AUDITED = ("identity", "orchestrator", "metering", "inference")


@dataclass
class World:
    """The mesh, one ConfigAuditService stub per audited service, and stubs for the changes."""

    mesh: Mesh
    audit: dict[str, audit_pb2_grpc.ConfigAuditServiceStub]
    metering: metering_pb2_grpc.MeteringServiceStub
    inference: inference_pb2_grpc.InferenceServiceStub
    data_dir: Path

    @property
    def operator(self) -> TenantHandle:
        return self.mesh.identity.operator

    async def events(self, service: str, caller: TenantHandle, tenant_id: str = "") -> list[apb.AuditEvent]:
        """The chain, oldest first (every page)."""
        out, token = [], ""
        while True:
            page = await self.audit[service].ListAuditEvents(
                apb.ListAuditEventsRequest(tenant_id=tenant_id, page_size=500, page_token=token, oldest_first=True),
                metadata=caller.metadata,
            )
            out += page.events
            token = page.next_page_token
            if not token:
                return out


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("config-audit")
    async with FakeAnthropic() as upstream, running_mesh(data_dir, upstream_url=upstream.base_url) as mesh:
        channels = {
            "identity": grpc.aio.insecure_channel(mesh.identity.address),
            "orchestrator": grpc.aio.insecure_channel(mesh.orchestrator.address),
            **{s: grpc.aio.insecure_channel(mesh.addr(s)) for s in ("metering", "inference")},
        }
        mesh.channels.extend(channels.values())
        yield World(
            mesh,
            {s: audit_pb2_grpc.ConfigAuditServiceStub(ch) for s, ch in channels.items()},
            metering_pb2_grpc.MeteringServiceStub(channels["metering"]),
            inference_pb2_grpc.InferenceServiceStub(channels["inference"]),
            data_dir,
        )


_tenants: dict[str, TenantHandle] = {}


async def tenant_of(world: World, tier: str) -> TenantHandle:
    """One tenant per tier for the whole module (created once)."""
    if tier not in _tenants:
        _tenants[tier] = await world.mesh.tenant(tier)
    return _tenants[tier]


@dataclass
class Change:
    """What one configuration change must append, and to whose chain."""

    service: str
    action: str
    chain: str
    """"tenant" (the tenant changed), or "platform" (t_platform: prices)."""
    by_operator: bool
    run: Callable[[World, TenantHandle], Awaitable[Callable[[], Awaitable[object]]]]
    """Does any set-up, then returns the change itself."""
    fresh: bool = False
    """On a tenant of its own (its status changes), read by the operator (a suspended tenant cannot)."""


def _name() -> str:
    return f"n{uuid.uuid4().hex[:8]}"


async def _create_principal(w: World, t: TenantHandle):
    return lambda: w.mesh.identity.stub.CreatePrincipal(
        idn.CreatePrincipalRequest(kind=idn.PRINCIPAL_KIND_SERVICE_ACCOUNT, display_name=_name(), scopes=["state.*"]),
        metadata=t.metadata,
    )


async def _disable_principal(w: World, t: TenantHandle):
    made = await (await _create_principal(w, t))()
    return lambda: w.mesh.identity.stub.DisablePrincipal(
        idn.DisablePrincipalRequest(principal_id=made.principal.id), metadata=t.metadata
    )


async def _admin_id(w: World, t: TenantHandle) -> str:
    keys = await w.mesh.identity.stub.ListApiKeys(idn.ListApiKeysRequest(), metadata=t.metadata)
    return keys.api_keys[0].principal_id


async def _create_key(w: World, t: TenantHandle):
    admin = await _admin_id(w, t)
    return lambda: w.mesh.identity.stub.CreateApiKey(
        idn.CreateApiKeyRequest(principal_id=admin, scopes=["state.*"], display_name="ci"), metadata=t.metadata
    )


async def _revoke_key(w: World, t: TenantHandle):
    made = await (await _create_key(w, t))()
    return lambda: w.mesh.identity.stub.RevokeApiKey(
        idn.RevokeApiKeyRequest(api_key_id=made.api_key.id), metadata=t.metadata
    )


def _status(status: int):
    async def run(w: World, t: TenantHandle):
        if status == idn.TENANT_STATUS_ACTIVE:  # resuming needs a suspended tenant
            await w.mesh.identity.stub.UpdateTenantStatus(
                idn.UpdateTenantStatusRequest(tenant_id=t.tenant_id, status=idn.TENANT_STATUS_SUSPENDED),
                metadata=w.operator.metadata,
            )
        return lambda: w.mesh.identity.stub.UpdateTenantStatus(
            idn.UpdateTenantStatusRequest(tenant_id=t.tenant_id, status=status), metadata=w.operator.metadata
        )

    return run


async def _delete_tenant(w: World, t: TenantHandle):
    async def change():
        reply = await w.mesh.identity.stub.DeleteTenant(
            idn.DeleteTenantRequest(tenant_id=t.tenant_id, grace_seconds=3600), metadata=w.operator.metadata
        )
        # Cancel it again (one more event: tenant.resume) so the module's tenant stays usable.
        await w.mesh.identity.stub.UpdateTenantStatus(
            idn.UpdateTenantStatusRequest(tenant_id=t.tenant_id, status=idn.TENANT_STATUS_ACTIVE),
            metadata=w.operator.metadata,
        )
        return reply

    return change


async def _create_team(w: World, t: TenantHandle):
    return lambda: w.mesh.stub.CreateTeam(opb.CreateTeamRequest(team=team_pb(_name())), metadata=t.metadata)


async def _update_team(w: World, t: TenantHandle):
    made = (await w.mesh.stub.CreateTeam(opb.CreateTeamRequest(team=team_pb(_name())), metadata=t.metadata)).team
    made.description = "changed"
    from google.protobuf import field_mask_pb2

    return lambda: w.mesh.stub.UpdateTeam(
        opb.UpdateTeamRequest(team=made, update_mask=field_mask_pb2.FieldMask(paths=["description"])),
        metadata=t.metadata,
    )


async def _delete_team(w: World, t: TenantHandle):
    name = _name()
    await w.mesh.stub.CreateTeam(opb.CreateTeamRequest(team=team_pb(name)), metadata=t.metadata)
    return lambda: w.mesh.stub.DeleteTeam(opb.DeleteTeamRequest(name=name), metadata=t.metadata)


async def _set_quota(w: World, t: TenantHandle):
    # The mesh's metering has no identity to ask for tiers: a call of the tenant's own tells it.
    with contextlib.suppress(grpc.aio.AioRpcError):
        await w.metering.ReserveBudget(
            mpb.ReserveBudgetRequest(model="claude-test", prompt_tokens=1, max_output_tokens=1), metadata=t.metadata
        )
    quota = mpb.Quota(
        tenant_id=t.tenant_id,
        requests_per_minute=600,
        tokens_per_minute=100000,
        budgets=[
            mpb.Budget(
                unit=mpb.BUDGET_UNIT_TOKENS, limit=1_000_000, period=mpb.BUDGET_PERIOD_MONTH, mode=mpb.BUDGET_MODE_HARD
            )
        ],
    )
    return lambda: w.metering.SetQuota(mpb.SetQuotaRequest(quota=quota), metadata=w.operator.metadata)


async def _set_price(w: World, t: TenantHandle):
    from google.protobuf.timestamp_pb2 import Timestamp

    price = mpb.Price(
        model=f"claude-{_name()}",
        effective_time=Timestamp(seconds=1_700_000_000),
        input_micros_per_mtok=3_000_000,
        output_micros_per_mtok=15_000_000,
    )
    return lambda: w.metering.SetPrice(mpb.SetPriceRequest(price=price), metadata=w.operator.metadata)


async def _set_policy(w: World, t: TenantHandle):
    policy = ipb.ModelPolicy(allowed_models=["claude-test"], default_model="claude-test", max_tokens_ceiling=512)
    return lambda: w.inference.SetModelPolicy(
        ipb.SetModelPolicyRequest(tenant_id=t.tenant_id, policy=policy), metadata=w.operator.metadata
    )


async def _register_model(w: World, t: TenantHandle):
    model = ipb.PrivateModel(
        name=f"m-{_name()}",
        upstream_model="llama-x",
        base_url="https://models.example/v1",
        lineage="fine-tune of llama-x",
    )
    return lambda: w.inference.RegisterPrivateModel(ipb.RegisterPrivateModelRequest(model=model), metadata=t.metadata)


async def _revoke_token(w: World, t: TenantHandle):
    fresh = await w.mesh.identity.login(t.api_key)
    return lambda: w.mesh.identity.stub.RevokeToken(idn.RevokeTokenRequest(jti=fresh.jti), metadata=t.metadata)


async def _set_retention(w: World, t: TenantHandle):
    import random

    return lambda: w.mesh.identity.stub.SetRetentionPolicy(
        idn.SetRetentionPolicyRequest(tenant_id=t.tenant_id, audit_days=random.randint(1, 3653), usage_detail_days=30),
        metadata=w.operator.metadata,
    )


async def _rotate_signing_key(w: World, t: TenantHandle):
    return lambda: w.mesh.identity.stub.RotateSigningKey(idn.RotateSigningKeyRequest(), metadata=w.operator.metadata)


CHANGES = {
    "principal.create": Change("identity", "principal.create", "tenant", False, _create_principal),
    "principal.disable": Change("identity", "principal.disable", "tenant", False, _disable_principal),
    "api_key.create": Change("identity", "api_key.create", "tenant", False, _create_key),
    "api_key.revoke": Change("identity", "api_key.revoke", "tenant", False, _revoke_key),
    "token.revoke": Change("identity", "token.revoke", "tenant", False, _revoke_token),
    "signing_key.rotate": Change("identity", "signing_key.rotate", "platform", True, _rotate_signing_key),
    "tenant.suspend": Change(
        "identity", "tenant.suspend", "tenant", True, _status(idn.TENANT_STATUS_SUSPENDED), fresh=True
    ),
    "tenant.resume": Change("identity", "tenant.resume", "tenant", True, _status(idn.TENANT_STATUS_ACTIVE), fresh=True),
    "tenant.retention": Change("identity", "tenant.retention", "tenant", True, _set_retention),
    "tenant.delete": Change("identity", "tenant.delete", "tenant", True, _delete_tenant, fresh=True),
    "team.create": Change("orchestrator", "team.create", "tenant", False, _create_team),
    "team.update": Change("orchestrator", "team.update", "tenant", False, _update_team),
    "team.delete": Change("orchestrator", "team.delete", "tenant", False, _delete_team),
    "quota.set": Change("metering", "quota.set", "tenant", True, _set_quota),
    "price.set": Change("metering", "price.set", "platform", True, _set_price),
    "model_policy.set": Change("inference", "model_policy.set", "tenant", True, _set_policy),
    "private_model.register": Change("inference", "private_model.register", "tenant", False, _register_model),
}


@pytest.mark.parametrize("tier", ["pooled", "bridge", "silo"])
@pytest.mark.parametrize("name", sorted(CHANGES))
async def test_each_configuration_change_appends_exactly_one_event(world: World, name: str, tier: str) -> None:
    """The change adds one event (two for delete-then-resume, whose second is tenant.resume) to the
    changed tenant's chain in the owning service, naming the actor, linked to the one before."""
    change = CHANGES[name]
    t = await world.mesh.tenant(tier) if change.fresh else await tenant_of(world, tier)
    reader, chain_id = (t, "") if change.chain == "tenant" else (world.operator, "t_platform")
    if change.fresh:
        reader, chain_id = world.operator, t.tenant_id
    do = await change.run(world, t)
    before = await world.events(change.service, reader, chain_id)
    reply = await do()
    after = await world.events(change.service, reader, chain_id)
    added = after[len(before) :]
    expected = 2 if name == "tenant.delete" else 1
    assert len(added) == expected, [e.action for e in added]
    event = added[0]
    assert event.action == change.action
    assert event.sequence == (before[-1].sequence if before else 0) + 1
    assert event.prev_hash == (before[-1].hash if before else "0" * 64)
    actor = world.operator if change.by_operator else t
    assert event.actor.principal_id == (await _principal_of(world, actor))
    assert event.actor.operator_id == (
        event.actor.principal_id if change.by_operator and change.chain == "tenant" else ""
    )
    assert event.target and not event.target.endswith("/") and "?" not in event.target
    text = str(event) + str(reply.SerializeToString())
    for secret in (t.api_key, t.token, world.operator.token):
        assert secret not in str(event)
    if name == "api_key.create":
        assert reply.secret and reply.secret not in str(event)
        assert event.target == f"api_key/{reply.api_key.id}"
    assert text
    check = await world.audit[change.service].VerifyAuditEvents(
        apb.VerifyAuditEventsRequest(tenant_id=chain_id), metadata=reader.metadata
    )
    assert check.intact, check.problem
    assert check.head.sequence == after[-1].sequence and check.head.hash == after[-1].hash


async def _principal_of(world: World, who: TenantHandle) -> str:
    import base64
    import json

    payload = who.token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sub"]


async def test_creating_a_tenant_starts_its_chain_with_the_operator_as_actor(world: World) -> None:
    """CreateTenant's event is the first of the new tenant's identity chain; the admin key is not in it."""
    t = await world.mesh.tenant("bridge")
    events = await world.events("identity", t)
    assert [e.action for e in events] == ["tenant.create"]
    assert events[0].target == f"tenant/{t.tenant_id}"
    assert events[0].detail["tier"] == "bridge"
    assert events[0].actor.operator_id == await _principal_of(world, world.operator)
    assert t.api_key not in str(events[0])


async def test_a_failed_change_appends_nothing(world: World) -> None:
    """A refused change (a duplicate team name) leaves the chain as it was."""
    t = await tenant_of(world, "pooled")
    name = _name()
    await world.mesh.stub.CreateTeam(opb.CreateTeamRequest(team=team_pb(name)), metadata=t.metadata)
    before = await world.events("orchestrator", t)
    with pytest.raises(grpc.aio.AioRpcError):
        await world.mesh.stub.CreateTeam(opb.CreateTeamRequest(team=team_pb(name)), metadata=t.metadata)
    assert await world.events("orchestrator", t) == before


@pytest.mark.parametrize("service", AUDITED)
async def test_a_tenant_reads_only_its_own_chain(world: World, service: str) -> None:
    """A's request naming B's tenant is refused exactly like one naming a made-up tenant; an operator reads B's."""
    a, b = await tenant_of(world, "pooled"), await tenant_of(world, "bridge")
    replies = []
    for target in (b.tenant_id, f"t_{uuid.uuid4().hex[:12]}"):
        for call in (
            world.audit[service].ListAuditEvents(apb.ListAuditEventsRequest(tenant_id=target), metadata=a.metadata),
            world.audit[service].VerifyAuditEvents(apb.VerifyAuditEventsRequest(tenant_id=target), metadata=a.metadata),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            replies.append((err.value.code(), err.value.details(), error_details(err.value).get("reason")))
    assert replies[0] == replies[2] and replies[1] == replies[3]
    assert replies[0] == (grpc.StatusCode.PERMISSION_DENIED, replies[0][1], "OPERATOR_ONLY")
    own = await world.events(service, b)
    assert await world.events(service, world.operator, b.tenant_id) == own


async def test_bad_input_is_refused_precisely(world: World) -> None:
    """A malformed tenant id or page token: INVALID_ARGUMENT with its reason."""
    t = await tenant_of(world, "pooled")
    for request, reason in (
        (apb.ListAuditEventsRequest(tenant_id="not a tenant"), "INVALID_TENANT_ID"),
        (apb.ListAuditEventsRequest(page_token="!!"), "INVALID_PAGE_TOKEN"),
        (apb.ListAuditEventsRequest(page_size=-1), None),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await world.audit["orchestrator"].ListAuditEvents(request, metadata=t.metadata)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        if reason:
            assert error_details(err.value)["reason"] == reason


async def test_list_pages_newest_first_and_filters(world: World) -> None:
    """Newest first by default, pages without overlap, action prefix and target filters."""
    t = await world.mesh.tenant("pooled")
    names = [_name() for _ in range(3)]
    for n in names:
        await world.mesh.stub.CreateTeam(opb.CreateTeamRequest(team=team_pb(n)), metadata=t.metadata)
    await world.mesh.stub.DeleteTeam(opb.DeleteTeamRequest(name=names[0]), metadata=t.metadata)
    stub = world.audit["orchestrator"]
    first = await stub.ListAuditEvents(apb.ListAuditEventsRequest(page_size=3), metadata=t.metadata)
    second = await stub.ListAuditEvents(
        apb.ListAuditEventsRequest(page_size=3, page_token=first.next_page_token), metadata=t.metadata
    )
    assert [e.sequence for e in (*first.events, *second.events)] == [4, 3, 2, 1]
    assert first.head.sequence == 4 and not second.next_page_token
    teams = await stub.ListAuditEvents(apb.ListAuditEventsRequest(action="team"), metadata=t.metadata)
    assert len(teams.events) == 4
    deletes = await stub.ListAuditEvents(apb.ListAuditEventsRequest(action="team.delete"), metadata=t.metadata)
    assert [e.target for e in deletes.events] == [f"team/{names[0]}"]
    about = await stub.ListAuditEvents(apb.ListAuditEventsRequest(target=f"team/{names[0]}"), metadata=t.metadata)
    assert [e.action for e in about.events] == ["team.delete", "team.create"]


def _tamper(path: Path) -> sqlite3.Connection:
    """A second writer on the service's SQLite file, waiting for the service's write lock as any writer does
    (sqlite3's default 5 s ran out on a starved CI host)."""
    return sqlite3.connect(path, timeout=60)


def _orchestrator_db(world: World) -> Path:
    found = [p for p in world.data_dir.rglob("*.db") if "orchestrator" in str(p) and "file" not in p.name]
    for path in found:
        with _tamper(path) as conn:
            if conn.execute(
                "SELECT name FROM sqlite_master WHERE name = 'orchestrator_config_audit_events'"
            ).fetchone():
                return path
    raise AssertionError(f"no orchestrator database among {found}")


@pytest.mark.parametrize("tamper", ["update", "delete"])
async def test_tampering_is_caught_by_verify(world: World, tamper: str) -> None:
    """Changing a stored field or deleting a middle event (directly in the database) breaks the chain
    at that sequence: VerifyAuditEvents and `bulkhead audit verify` name the service and the sequence."""
    t = await world.mesh.tenant("pooled")
    for _ in range(3):
        await world.mesh.stub.CreateTeam(opb.CreateTeamRequest(team=team_pb(_name())), metadata=t.metadata)
    path = _orchestrator_db(world)
    with _tamper(path) as conn:
        if tamper == "update":
            changed = conn.execute(
                "UPDATE orchestrator_config_audit_events SET target = 'team/other' WHERE tenant_id = ? AND seq = 2",
                (t.tenant_id,),
            ).rowcount
        else:
            changed = conn.execute(
                "DELETE FROM orchestrator_config_audit_events WHERE tenant_id = ? AND seq = 2", (t.tenant_id,)
            ).rowcount
        assert changed == 1
    report = await world.audit["orchestrator"].VerifyAuditEvents(apb.VerifyAuditEventsRequest(), metadata=t.metadata)
    assert not report.intact and report.first_bad_sequence == 2, report
    assert report.service == "orchestrator"
    assert ("changed" if tamper == "update" else "missing") in report.problem
    for service in ("identity", "metering", "inference"):
        assert (
            await world.audit[service].VerifyAuditEvents(apb.VerifyAuditEventsRequest(), metadata=t.metadata)
        ).intact


@pytest.fixture
def cli(world: World, monkeypatch, capsys):
    """Run a bulkhead command as one tenant against the mesh (in a thread: the servers share this loop)."""
    env = {
        "BULKHEAD_IDENTITY_ADDR": world.mesh.identity.address,
        "BULKHEAD_ORCHESTRATOR_ADDR": world.mesh.orchestrator.address,
        **{f"BULKHEAD_{s.upper()}_ADDR": world.mesh.addr(s) for s in ("credentials", "metering", "inference")},
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


async def test_cli_verify_reports_every_chain_and_fails_on_a_break(world: World, cli) -> None:
    """`bulkhead audit verify` prints one row per service's configuration chain plus the credentials
    access chain, exits 0 when all are intact and 1 naming the service and event after tampering."""
    t = await world.mesh.tenant("pooled")
    for _ in range(3):
        await world.mesh.stub.CreateTeam(opb.CreateTeamRequest(team=team_pb(_name())), metadata=t.metadata)
    code, out, err = await cli(t, "audit", "verify")
    assert code == 0, err
    lines = out.splitlines()
    for service, chain in (*((s, "configuration") for s in AUDITED), ("credentials", "secret access")):
        assert any(service in line and chain in line and "intact" in line for line in lines), out
    with _tamper(_orchestrator_db(world)) as conn:
        conn.execute("DELETE FROM orchestrator_config_audit_events WHERE tenant_id = ? AND seq = 2", (t.tenant_id,))
    code, out, err = await cli(t, "audit", "verify")
    assert code == 1
    assert "BROKEN at event 2 in orchestrator (configuration" in err
    code, out, err = await cli(world.operator, "audit", "verify", "--tenant", t.tenant_id)
    assert code == 1 and "BROKEN at event 2 in orchestrator" in err
    assert "skipped" in out  # the access chain answers its own tenant only


async def test_cli_list_shows_newest_first_with_filters(world: World, cli) -> None:
    """`bulkhead audit list` merges the chains newest first; --action/--service filter; an operator names a tenant."""
    t = await world.mesh.tenant("silo")
    name = _name()
    await world.mesh.stub.CreateTeam(opb.CreateTeamRequest(team=team_pb(name)), metadata=t.metadata)
    await world.mesh.stub.DeleteTeam(opb.DeleteTeamRequest(name=name), metadata=t.metadata)
    code, out, err = await cli(t, "audit", "list")
    assert code == 0, err
    rows = [line for line in out.splitlines()[2:] if line.strip()]
    actions = [next(a for a in ("team.delete", "team.create", "tenant.create") if a in r) for r in rows]
    assert actions == ["team.delete", "team.create", "tenant.create"], out
    code, out, _ = await cli(t, "audit", "list", "--action", "team.delete")
    assert code == 0 and f"team/{name}" in out and "team.create" not in out
    code, out, _ = await cli(world.operator, "audit", "list", "--tenant", t.tenant_id, "--service", "identity")
    assert code == 0 and "tenant.create" in out and "(operator)" in out and "team." not in out
    code, _, err = await cli(t, "audit", "list", "--tenant", "t_someoneelse", "--service", "orchestrator")
    assert code == 1 and "OPERATOR_ONLY" in err


async def test_exactly_the_listed_services_serve_the_configuration_audit(world: World) -> None:
    """SERVED_BY (what the attack matrix attacks) is true: those four answer, credentials and state do not serve it."""
    from shared.config_audit import SERVED_BY

    t = await tenant_of(world, "pooled")
    for service in ("identity", "orchestrator", "metering", "inference", "credentials", "state"):
        address = (
            world.mesh.identity.address
            if service == "identity"
            else (world.mesh.orchestrator.address if service == "orchestrator" else world.mesh.addr(service))
        )
        async with grpc.aio.insecure_channel(address) as channel:
            call = audit_pb2_grpc.ConfigAuditServiceStub(channel).ListAuditEvents(
                apb.ListAuditEventsRequest(), metadata=t.metadata
            )
            if service in SERVED_BY:
                assert (await call).service == service
            else:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, service
    assert set(SERVED_BY) == set(AUDITED)


async def test_cli_verify_all_tenants_names_each_broken_chain(world: World, cli) -> None:
    """An operator's `audit verify --all-tenants` checks every tenant's four chains and names the broken one."""
    intact, broken = await world.mesh.tenant("pooled"), await world.mesh.tenant("pooled")
    for t in (intact, broken):
        for _ in range(2):
            await world.mesh.stub.CreateTeam(opb.CreateTeamRequest(team=team_pb(_name())), metadata=t.metadata)
    with _tamper(_orchestrator_db(world)) as conn:
        conn.execute(
            "UPDATE orchestrator_config_audit_events SET principal_id = 'p_forged' WHERE tenant_id = ? AND seq = 1",
            (broken.tenant_id,),
        )
    code, out, err = await cli(world.operator, "audit", "verify", "--all-tenants")
    assert code == 1
    assert f"BROKEN at event 1 in orchestrator (configuration, tenant {broken.tenant_id})" in err
    rows = {(line.split()[0], line.split()[1]): line for line in out.splitlines()[2:] if line.strip()}
    assert all(rows[(intact.tenant_id, s)].rstrip().endswith("intact") for s in AUDITED)
    assert "intact" in rows[(broken.tenant_id, "identity")] and "BROKEN" in rows[(broken.tenant_id, "orchestrator")]

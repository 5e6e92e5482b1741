"""Moving a tenant to another region is a migration: MigrateTenant(target_region="eu") on the regional mesh
(us, the default, and eu, each with its own databases). A pooled, a bridge and a silo tenant of us, each with
one resource of every kind (secret, ciphertext, team, run, thread, context, private model, usage, holds,
security events, a rotating secret's schedule), move to eu: on SQLite with secrets sealed in the database,
and on Postgres with each region's OpenBao (where the Transit key and the values move too).

Afterwards a superuser scan of every table of every database (every SQLite file) finds each mover's id in
eu's stores only (apart from identity's directory and the documented platform tables of the default
region), its schema / database / file on the eu side only, its key and values in eu's OpenBao only;
identity places it in eu; a token issued before the move still reads its secret, decrypts a ciphertext
made before it, reads its events; a us bystander's rows are exactly as before. The bridge tenant moves
through `bulkhead tenants migrate NAME --region eu`.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from prometheus_client import CollectorRegistry

from bulkhead.credentials.v1 import credentials_pb2 as cred
from bulkhead.credentials.v1 import credentials_pb2_grpc
from bulkhead.identity.v1 import identity_pb2 as idn
from bulkhead.state.v1 import state_pb2 as st
from bulkhead.state.v1 import state_pb2_grpc
from bulkhead_cli import main
from shared.db.router import tenant_slug
from shared.errors import error_details
from testkit.fake_anthropic import FakeAnthropic
from tests.isolation.resources import SECRET_VALUE, make_victim
from tests.lifecycle.test_delete_mesh import addresses
from tests.lifecycle.test_migrate_mesh import wait_migration
from tests.lifecycle.test_residency import (
    HOME_PLATFORM_TABLES,
    database_names,
    openbao_holds,
    postgres_tables,
    region_of_store,
    rotating_secret,
    running_regional_mesh,
    scan,
    second_openbao,  # noqa: F401 - the fixture
    sqlite_tables,
)
from tests.services.orchestrator.mesh import TIERS

PAUSE_RIDE = 15.0
"""Seconds a read after the move may meet the migration pause: a replica lifts it at the switch or
when identity's feed next shows the move done, and callers retry TENANT_MIGRATING as it asks."""


async def served(call, request, metadata):
    """The call's reply, retrying TENANT_MIGRATING refusals (the bounded pause) for up to PAUSE_RIDE s."""
    deadline = asyncio.get_running_loop().time() + PAUSE_RIDE
    while True:
        try:
            return await call(request, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            migrating = (
                exc.code() == grpc.StatusCode.UNAVAILABLE and error_details(exc).get("reason") == "TENANT_MIGRATING"
            )
            if not migrating or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


pytestmark = [pytest.mark.slow]


@pytest.mark.parametrize(
    "database, secrets_backend",
    [
        ("sqlite", "local"),
        pytest.param("postgres", "vault", marks=[pytest.mark.postgres, pytest.mark.openbao]),
    ],
)
async def test_moving_tenants_us_to_eu_leaves_their_rows_in_eu_only(
    tmp_path, request, database, secrets_backend, monkeypatch, capsys
):
    monkeypatch.setattr("services.metering.server.REGISTRY", CollectorRegistry())
    postgres = request.getfixturevalue("postgres") if database == "postgres" else None
    vaults = None
    if secrets_backend == "vault":
        vaults = {"us": request.getfixturevalue("openbao"), "eu": request.getfixturevalue("second_openbao")}
    existing = await database_names(postgres.admin_url) if postgres else set()
    async with (
        FakeAnthropic() as upstream,
        running_regional_mesh(tmp_path, postgres, upstream.base_url, vaults) as mesh,
    ):
        await mesh.orchestrator.dispatcher.stop()  # runs stay queued (and in the orchestrator's rows) while moving
        mesh.identity.app.deletions.peers.update(addresses(mesh))  # the coordinators' peers
        mesh.identity.app.migrations._feed_wait = 1.2  # one process: every service polls the feed each second
        for name, value in mesh.env.items():  # the CLI's connection, as an operator's shell would have it
            if name.endswith("_ADDR"):
                monkeypatch.setenv(name, value)
        monkeypatch.setenv("BULKHEAD_IDENTITY_ADDR", mesh.identity.address)
        monkeypatch.setenv("BULKHEAD_API_KEY", mesh.identity.operator.api_key)
        monkeypatch.delenv("BULKHEAD_TOKEN", raising=False)
        named = {s: mesh.addr(s) for s in ("credentials", "state", "inference", "metering")}
        channels = {s: grpc.aio.insecure_channel(a) for s, a in {**named, "identity": mesh.identity.address}.items()}
        op = mesh.identity.operator.metadata
        where = (
            (lambda: postgres_tables(postgres.admin_url, existing)) if postgres else (lambda: sqlite_tables(tmp_path))
        )
        try:
            movers, made = {}, {}
            # On Postgres + OpenBao the silo and pooled movers (a bridge one moves on SQLite, through the CLI).
            for tier in TIERS if vaults is None else ("pooled", "silo"):
                created = await mesh.identity.stub.CreateTenant(
                    idn.CreateTenantRequest(name=f"mv-{tier}", tier=TIERS[tier], region="us"), metadata=op
                )
                movers[tier] = await mesh.identity.login(created.admin_api_key)
                made[tier] = await make_victim(mesh, channels, movers[tier])
                await rotating_secret(channels, movers[tier])
            created = await mesh.identity.stub.CreateTenant(
                idn.CreateTenantRequest(name="mv-stay", region="us"), metadata=op
            )
            bystander = await mesh.identity.login(created.admin_api_key)
            await make_victim(mesh, channels, bystander)
            ids = [t.tenant_id for t in [*movers.values(), bystander]]
            before = await scan(where(), ids)
            assert all({h.region for h in before[t.tenant_id]} >= {"us"} for t in movers.values())

            # Bad input first: an unknown region is refused, nothing planned.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await mesh.identity.stub.MigrateTenant(
                    idn.MigrateTenantRequest(tenant_id=movers["pooled"].tenant_id, target_region="mars"), metadata=op
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "us, eu" in err.value.details()

            for tier, t in movers.items():
                if tier == "bridge":  # through the CLI, by name, with its progress
                    capsys.readouterr()
                    code = await asyncio.to_thread(main, ["tenants", "migrate", "mv-bridge", "--region", "eu"])
                    out = capsys.readouterr().out
                    assert code in (0, None), out
                    assert "bridge in us -> bridge in eu" in out and "is bridge in eu now" in out, out
                    assert "credentials" in out and "released" in out, out
                else:
                    planned = (
                        await mesh.identity.stub.MigrateTenant(
                            idn.MigrateTenantRequest(tenant_id=t.tenant_id, target_region="eu"), metadata=op
                        )
                    ).migration
                    assert (planned.source_region, planned.target_region) == ("us", "eu")
                    assert planned.source_tier == planned.target_tier == TIERS[tier]
                done = await wait_migration(mesh, t.tenant_id, timeout=90)
                assert all(step.phase == "released" for step in done.steps), done
                again = await mesh.identity.stub.MigrateTenant(
                    idn.MigrateTenantRequest(  # a repeat: same plan
                        tenant_id=t.tenant_id, target_region="eu"
                    ),
                    metadata=op,
                )
                assert again.migration.generation == done.generation
                tenant = (
                    await mesh.identity.stub.GetTenant(idn.GetTenantRequest(tenant_id=t.tenant_id), metadata=op)
                ).tenant
                assert tenant.region == "eu" and tenant.tier == TIERS[tier]

            after = await scan(where(), ids)
            for tier, t in movers.items():
                found = after[t.tenant_id]
                assert any(h.region == "eu" for h in found), tier
                misplaced = sorted(
                    f"{h.store}.{h.table}"
                    for h in found
                    if h.region not in ("eu", "control") and not (h.region == "us" and h.table in HOME_PLATFORM_TABLES)
                )
                assert misplaced == [], f"{tier} tenant's id left outside eu: {misplaced}"
                assert {h.region for h in found if h.table == "cred_schedule"} == {"eu"}, tier
                if tier != "pooled":  # its own schema, database or file: on eu's side only
                    own = {h.store for h in found if tenant_slug(t.tenant_id) in h.store}
                    assert own and {region_of_store(store) for store in own} == {"eu"}, own
                if vaults:  # its Transit key and secret values: in eu's OpenBao only
                    assert openbao_holds(vaults["eu"], t.tenant_id, tier) == (True, True), tier
                    assert openbao_holds(vaults["us"], t.tenant_id, tier) == (False, False), tier
                # The token issued before the move: secret, old ciphertext and events, now served from eu.
                creds = credentials_pb2_grpc.CredentialsServiceStub(channels["credentials"])
                got = await served(creds.GetSecret, cred.GetSecretRequest(name=made[tier].secret_name), t.metadata)
                assert got.value == SECRET_VALUE
                plain = await served(creds.Decrypt, cred.DecryptRequest(ciphertext=made[tier].ciphertext), t.metadata)
                assert plain.plaintext == SECRET_VALUE
                state = state_pb2_grpc.StateServiceStub(channels["state"])
                events = await served(
                    state.ReadEvents, st.ReadEventsRequest(thread_id=made[tier].thread_id), t.metadata
                )
                assert [e.payload for e in events.events] == [SECRET_VALUE]
            assert after[bystander.tenant_id] == before[bystander.tenant_id]
        finally:
            for ch in channels.values():
                await ch.close()

"""MigrateTenant over the whole mesh on real Postgres (a database per service, app role under RLS) with
credentials on OpenBao and state's data keys from credentials' Transit keys: pooled -> bridge -> silo ->
pooled with a live writer (into silo and back, credentials moves the tenant's secrets and Transit key into its
own OpenBao namespace and back: the writer's events, encrypted with data keys that key wrapped, keep decrypting).

At each hop every service's moving tables verify equal, the tenant's inventories (outside the writer's
state tables) are what they were, the bridge schema exists only while the tenant is bridge, the writer (a
token issued before the moves) saw only retried TENANT_MIGRATING pauses and finds every acknowledged
event once (still decrypting), its secret still reads, and the bystanders' inventories are unchanged.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from bulkhead.credentials.v1 import credentials_pb2 as cr
from bulkhead.credentials.v1 import credentials_pb2_grpc
from bulkhead.identity.v1 import identity_pb2 as idn
from bulkhead.state.v1 import state_pb2 as st
from bulkhead.state.v1 import state_pb2_grpc
from services.identity.peers import PlatformCaller
from testkit.fake_anthropic import FakeAnthropic
from tests.isolation import resources
from tests.isolation.resources import make_victim
from tests.lifecycle.pg_mesh import running_pg_mesh
from tests.lifecycle.test_delete_mesh import addresses, inventories
from tests.lifecycle.test_migrate_mesh import comparable, read_all, wait_migration
from tests.lifecycle.test_migrate_postgres import Writer
from tests.lifecycle.test_residency import openbao_holds
from tests.services.orchestrator.mesh import TIERS

pytestmark = [pytest.mark.postgres, pytest.mark.openbao, pytest.mark.slow]


async def test_pooled_bridge_silo_pooled_on_postgres_and_openbao(tmp_path, postgres, openbao, monkeypatch):
    async with FakeAnthropic() as upstream, running_pg_mesh(tmp_path, postgres, openbao, upstream.base_url) as mesh:
        await mesh.orchestrator.dispatcher.stop()
        mesh.identity.app.deletions.peers.update(addresses(mesh))
        named = {"identity": mesh.identity.address, **addresses(mesh)}
        channels = {s: grpc.aio.insecure_channel(a) for s, a in named.items()}
        by_addr = {named[s]: c for s, c in channels.items()}
        caller = PlatformCaller(mesh.identity.app.keys)
        op = mesh.identity.operator.metadata
        try:
            t = await mesh.tenant("pooled")
            others = {tier: await mesh.tenant(tier) for tier in ("pooled", "bridge")}
            monkeypatch.setattr(resources, "SECRET_VALUE", b"canary-migrating")
            ids = await make_victim(mesh, channels, t)
            for who in others.values():
                await make_victim(mesh, channels, who)
            state = state_pb2_grpc.StateServiceStub(channels["state"])
            creds = credentials_pb2_grpc.CredentialsServiceStub(channels["credentials"])
            await state.CreateThread(st.CreateThreadRequest(thread_id="live"), metadata=t.metadata)
            theirs = {tier: await inventories(mesh, by_addr, caller, o.tenant_id, tier) for tier, o in others.items()}
            mine = comparable(await inventories(mesh, by_addr, caller, t.tenant_id, "pooled"))
            writer = Writer(state, t.metadata, "live")
            task = asyncio.create_task(writer.run())
            pauses = []
            try:
                for target in ("bridge", "silo", "pooled"):
                    await asyncio.sleep(0.5)
                    await mesh.identity.stub.MigrateTenant(
                        idn.MigrateTenantRequest(tenant_id=t.tenant_id, target_tier=TIERS[target]), metadata=op
                    )
                    done = await wait_migration(mesh, t.tenant_id, timeout=120)
                    assert all(s.phase == "released" for s in done.steps), done
                    assert all(tbl.equal for s in done.steps for tbl in s.tables)
                    pauses.append(done.pause_ms)
                    assert comparable(await inventories(mesh, by_addr, caller, t.tenant_id, target)) == mine
                await asyncio.sleep(0.5)
            finally:
                writer.stop()
                await task
            assert writer.errors == []
            # Read last: the read is audited, which adds a row to credentials' access audit.
            secret = await creds.GetSecret(cr.GetSecretRequest(name=ids.secret_name), metadata=t.metadata)
            assert secret.value == b"canary-migrating"
            ciphertext = await creds.Decrypt(cr.DecryptRequest(ciphertext=ids.ciphertext), metadata=t.metadata)
            assert ciphertext.plaintext == b"canary-migrating"  # made before the first move
            assert openbao_holds(openbao, t.tenant_id, "pooled") == (True, True)  # back in the root namespace
            assert openbao_holds(openbao, t.tenant_id, "silo") == (False, False)  # its namespace released
            assert await read_all(state, t.metadata, "live") == writer.acked
            for tier, o in others.items():
                assert await inventories(mesh, by_addr, caller, o.tenant_id, tier) == theirs[tier]
            print(
                f"\npostgres mesh: identity-measured pauses (ms) {pauses}; writer's retried pauses (s) "
                f"{[round(p, 3) for p in writer.pauses]}; {len(writer.acked)} events"
            )
        finally:
            for ch in channels.values():
                await ch.close()

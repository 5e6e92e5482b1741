"""What identity publishes about a tier migration in the feed every replica polls (ListRevokedTokens),
watched from a service's seat (its own service key) while MigrateTenant moves a tenant pooled -> bridge
over the whole mesh (embedded SQLite):

- the tenant is published paused before any service copies, and no service copies before the
  coordinator's feed_wait (the feed's staleness bound) has passed since;
- the first answer that no longer pauses it already carries its new placement (bridge, generation >= 1):
  no replica can serve it by the old placement after the pause;
- a tenant never migrated has no placement in the feed.
"""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from bulkhead.identity.v1 import identity_pb2 as idn
from shared.keys import IdentityKeyLoader, ServiceKeyCredentials
from tests.lifecycle.test_migrate_mesh import mesh, wait_migration  # noqa: F401 (the fixture)
from tests.services.orchestrator.mesh import TIERS

pytestmark = [pytest.mark.slow]
FEED_WAIT = 1.5


async def test_pause_published_before_the_copy_and_lifted_after_the_placement(mesh):  # noqa: F811
    mesh.identity.app.migrations._feed_wait = FEED_WAIT
    channel = grpc.aio.insecure_channel(mesh.identity.address)
    loader = IdentityKeyLoader(channel, ServiceKeyCredentials(channel, mesh.identity.service_key_file("state")))
    op = mesh.identity.operator.metadata
    try:
        t, bystander = await mesh.tenant("pooled"), await mesh.tenant("pooled")
        answers: list[tuple[float, bool, tuple[str, int] | None]] = []
        first_copied = None
        stop = asyncio.Event()

        async def watch() -> None:
            nonlocal first_copied
            while not stop.is_set():
                await loader.load_revocations(0)
                paused, placements, _ = await loader.load_migrations()
                answers.append((time.monotonic(), t.tenant_id in paused, placements.get(t.tenant_id)))
                assert bystander.tenant_id not in paused and bystander.tenant_id not in placements
                if first_copied is None:
                    got = (await mesh.identity.stub.GetMigration(
                        idn.GetMigrationRequest(tenant_id=t.tenant_id), metadata=op)).migration
                    if any(s.phase != "pending" for s in got.steps):
                        first_copied = time.monotonic()
                await asyncio.sleep(0.02)

        await loader.load_revocations(0)
        assert t.tenant_id not in (await loader.load_migrations())[1]  # never migrated: not in the feed
        asked = time.monotonic()
        await mesh.identity.stub.MigrateTenant(
            idn.MigrateTenantRequest(tenant_id=t.tenant_id, target_tier=TIERS["bridge"]), metadata=op)
        watcher = asyncio.create_task(watch())
        done = await wait_migration(mesh, t.tenant_id)
        await asyncio.sleep(0.2)
        stop.set()
        await watcher
        assert done.generation >= 1

        paused_at = [at for at, paused, _ in answers if paused]
        assert paused_at, answers
        assert first_copied is not None and first_copied - asked >= FEED_WAIT - 0.05, (first_copied - asked)
        # Once lifted, never paused again; the first unpaused answer already places the tenant at bridge.
        lifted = [i for i, (_, paused, _) in enumerate(answers) if not paused and i > 0 and answers[i - 1][1]]
        assert len(lifted) == 1, answers
        for _, paused, placement in answers[lifted[0]:]:
            assert not paused and placement == ("bridge", done.generation)
        print(f"\nfeed: paused for {answers[lifted[0]][0] - paused_at[0]:.2f} s as seen by a poller; identity-"
              f"measured pause {done.pause_ms} ms (feed_wait {FEED_WAIT} s)")
    finally:
        await channel.close()

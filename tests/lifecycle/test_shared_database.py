"""Services sharing one Postgres database (`bulkhead up --postgres URL`: per-service tables and version tables)
share each bridge/silo tenant's own schema or database too. Releasing or purging it in one service removes that
service's tables only; the schema or database goes with the last service's part.

(Before: the first service to release a bridge tenant dropped the whole schema, every other service's
tables with it, and their ReleaseTenant then failed INTERNAL, "relation ... does not exist": the
bridge -> pooled migration under `bulkhead up --replicas 2` stuck in "releasing".)
"""

from __future__ import annotations

import secrets

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from services.credentials.server import MIGRATIONS as CREDENTIALS_MIGRATIONS
from services.credentials.store import CredentialsBase
from services.state.server import MIGRATIONS as STATE_MIGRATIONS
from services.state.store import StateBase
from shared.db import Database, bridge_schema, silo_database
from shared.db.raw import raw_transaction
from shared.lifecycle import Placement, TenantLifecycle
from shared.tiers import Tier

pytestmark = [pytest.mark.postgres]


async def _tables(admin_url: str, database: str, schema: str) -> set[str]:
    """The tables in `schema` of `database` (empty when either is gone), as superuser."""
    admin = create_async_engine(admin_url, poolclass=NullPool)
    try:
        async with admin.connect() as conn:
            if not await conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": database}):
                return set()
    finally:
        await admin.dispose()
    engine = create_async_engine(admin.url.set(database=database), poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            return set(
                (
                    await conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = :s"), {"s": schema})
                ).scalars()
            )
    finally:
        await engine.dispose()


async def _alive(conn: asyncpg.Connection) -> bool:
    try:
        await conn.fetchval("SELECT 1", timeout=5)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError, OSError):
        return False
    return True


async def test_one_service_releasing_or_purging_leaves_the_others_part_of_the_tenants_store(postgres):
    urls = await postgres.create_database("shared_db")
    main = urls.app_url.rsplit("/", 1)[1].split("?")[0]
    state_db = await Database.open(urls.app_url, migrations=str(STATE_MIGRATIONS), owner_url=urls.owner_url)
    cred_db = await Database.open(urls.app_url, migrations=str(CREDENTIALS_MIGRATIONS), owner_url=urls.owner_url)
    state = TenantLifecycle("state", state_db, StateBase.metadata)
    cred = TenantLifecycle("credentials", cred_db, CredentialsBase.metadata)
    try:
        # Bridge, as after a pooled -> bridge move: both services' tables in the tenant's schema, a row in each.
        tenant = f"t_shr{secrets.token_hex(4)}"
        schema = bridge_schema(tenant)
        for db in (state_db, cred_db):
            await db.router.route(tenant, "bridge")
        async with raw_transaction(
            (await cred_db.router.route(tenant, "bridge")).bind, tenant_id=tenant, schema=schema, write=True
        ) as tx:
            await tx.execute(
                "INSERT INTO cred_secrets (tenant_id, name, description, current_version, rotator, "
                "grace_period_s, created_us, updated_us) VALUES ($1, 'k', '', 1, 'random', 0, 1, 1)",
                tenant,
            )
        both = await _tables(postgres.admin_url, main, schema)
        assert {"cred_secrets", "state_threads"} <= both

        # bridge -> pooled: state releases first (its rows were copied), then credentials.
        for life in (state, cred):
            life.switch(tenant, Tier.POOLED)
        await state.release(tenant, Placement(Tier.BRIDGE), Placement(Tier.POOLED))
        left = await _tables(postgres.admin_url, main, schema)
        assert "cred_secrets" in left and not any(t.startswith("state_") for t in left), left
        source, _ = await cred.verify(tenant, Tier.BRIDGE, Tier.POOLED)  # credentials' part is intact
        assert {c.table: c.rows for c in source}["cred_secrets"] == 1
        released = await cred.release(tenant, Placement(Tier.BRIDGE), Placement(Tier.POOLED))
        assert [(c.table, c.rows) for c in released] == [("cred_secrets", 1)]
        assert await _tables(postgres.admin_url, main, schema) == set()  # the schema went with the last part
        assert await cred.release(tenant, Placement(Tier.BRIDGE), Placement(Tier.POOLED)) == []  # idempotent

        # Silo, purged service by service (a deletion): the database stays until the last service's part goes.
        other = f"t_shs{secrets.token_hex(4)}"
        for db in (state_db, cred_db):
            await db.router.route(other, "silo")
        silo = silo_database(main, other)
        purged = await state.purge(other, Tier.SILO)
        assert purged.dropped == [f"database:{silo}"]
        left = await _tables(postgres.admin_url, silo, "public")
        assert "cred_secrets" in left and not any(t.startswith("state_") for t in left), left
        # Another replica still has a session in the silo database (and autovacuum may): FORCE ends it.
        replica = await asyncpg.connect(urls.app_dsn.rsplit("/", 1)[0] + "/" + silo)
        try:
            assert (await cred.purge(other, Tier.SILO)).dropped == [f"database:{silo}"]
            assert replica.is_closed() or not await _alive(replica)
        finally:
            await replica.close(timeout=5)
        assert await _tables(postgres.admin_url, silo, "public") == set()
        assert (await state.purge(other, Tier.SILO)).dropped == []  # nothing of state's left to drop
    finally:
        await state_db.close()
        await cred_db.close()


async def test_a_router_follows_a_region_move_by_switch_feed_and_placement(tmp_path):
    """The region that routes a tenant: a SwitchTenant's on this replica, else identity's feed, else identity's
    placement (asked again once the feed shows a new generation); never a region this service has no database for."""
    from shared.config import RegionDatabase
    from shared.errors import FailedPrecondition
    from shared.tokens import MigrationFeed

    asked: list[str] = []
    placed = {"t_a": "us", "t_b": "us"}

    async def region_of(tenant_id: str) -> str:
        asked.append(tenant_id)
        return placed[tenant_id]

    eu = tmp_path / "eu" / "state.db"
    db = await Database.open(
        f"sqlite+aiosqlite:///{tmp_path / 'state.db'}",
        migrations=str(STATE_MIGRATIONS),
        region_of=region_of,
        regions={"us": None, "eu": RegionDatabase(f"sqlite+aiosqlite:///{eu}", f"sqlite+aiosqlite:///{eu}")},
    )
    router = db.router
    try:
        feed = MigrationFeed()
        router.follow(feed)
        feed.publish(frozenset(), {"t_a": ("pooled", 1)}, {"t_a": "us"})
        assert await router.region_of("t_a") == "us" and await router.region_of("t_b") == "us"
        router.place("t_a", "pooled", "eu")  # this replica got SwitchTenant(pooled, eu)
        assert await router.region_of("t_a") == "eu"
        assert (await router.main_route("t_a")).region == "eu"
        placed["t_b"] = "eu"  # t_b moved; its SwitchTenant went to another replica: the feed says so
        feed.publish(frozenset(), {"t_a": ("pooled", 1), "t_b": ("pooled", 2)}, {"t_a": "eu", "t_b": "eu"})
        assert await router.region_of("t_b") == "eu"
        feed.publish(frozenset(), {"t_a": ("pooled", 1), "t_b": ("pooled", 3)}, {})  # an older identity: no regions
        assert await router.region_of("t_b") == "eu" and asked.count("t_b") == 2  # asked again on the new generation
        with pytest.raises(FailedPrecondition):
            router.place("t_a", "pooled", "mars")
    finally:
        await db.close()

"""Identity's migration feed (shared.tokens.MigrationFeed) as every replica's router applies it: a
published pause refuses the tenant, a published placement routes it over its token's claim and over a
SwitchTenant of an earlier generation, nothing is served before the feed's first answer, and the feed
is applied once per change (its version), not per request."""

from __future__ import annotations

import time

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from shared.db import router as router_mod
from shared.db.router import TenantRouter
from shared.errors import Unavailable
from shared.tokens import MigrationFeed, RefreshingKeySource


@pytest.fixture
async def router(tmp_path):
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'main.db'}")
    r = TenantRouter(engine, url=engine.url, owner_url=None, migrations=None, app_role=None)
    yield r
    await engine.dispose()


class FeedLoader:
    def __init__(self):
        self.paused, self.placements = frozenset(), {}

    async def load_keys(self):
        return {}

    async def load_revocations(self, since):
        return since, {}

    async def load_suspended(self):
        return frozenset()

    async def load_migrations(self):
        return self.paused, dict(self.placements)


async def test_key_source_publishes_the_feed_and_bumps_its_version_only_on_change():
    loader = FeedLoader()
    source = RefreshingKeySource(loader, revocation_poll=3600)
    feed = source.migration_feed()
    assert feed is not None and not feed.loaded
    await source.refresh_revocations()
    assert feed.loaded and feed.version == 0 and feed.age() < 1
    loader.paused, loader.placements = frozenset({"t_a"}), {"t_a": ("bridge", 1)}
    await source.refresh_revocations()
    await source.refresh_revocations()
    assert feed.version == 1 and feed.paused == {"t_a"} and feed.placements == {"t_a": ("bridge", 1)}
    await source.close()


async def test_a_loader_without_migrations_gives_no_feed():
    class Plain:  # identity's own StoreKeyLoader is one: identity's rows never move
        async def load_keys(self):
            return {}

    source = RefreshingKeySource(Plain(), revocation_poll=3600)
    assert source.migration_feed() is None
    await source.close()


async def test_nothing_is_served_before_the_first_answer(router, monkeypatch):
    monkeypatch.setattr(router_mod, "FEED_FIRST_WAIT_S", 0.2)
    feed = MigrationFeed()
    router.follow(feed)
    with pytest.raises(Unavailable) as info:
        async with router.using("t_a", "pooled"):
            pass
    assert info.value.reason == "TENANT_TIER_UNAVAILABLE"
    feed.publish(frozenset(), {})
    async with router.using("t_a", "pooled") as route:
        assert route.schema is None


async def test_published_pause_refuses_and_lapses_when_identity_is_silent(router):
    feed = MigrationFeed()
    router.follow(feed)
    feed.publish(frozenset({"t_a"}), {})
    with pytest.raises(Unavailable) as info:
        async with router.using("t_a", "pooled"):
            pass
    assert info.value.reason == "TENANT_MIGRATING"
    async with router.using("t_b", "pooled"):  # another tenant is served
        pass
    feed.refreshed_at = time.monotonic() - router_mod.FEED_PAUSE_LEASE_S - 1  # identity silent too long
    assert not router.paused("t_a")
    feed.publish(frozenset(), {})
    assert not router.paused("t_a")


async def test_published_placement_routes_over_the_claim_and_an_older_switch(router):
    feed = MigrationFeed()
    router.follow(feed)
    feed.publish(frozenset(), {"t_a": ("bridge", 1)})
    assert router.placed_tier("t_a", "pooled") == "bridge"  # a token issued before the switch
    assert router.placed_tier("t_b", "silo") == "silo"  # never migrated: its claim routes it
    router.place("t_a", "bridge")  # this replica got SwitchTenant(bridge) at generation 1
    feed.publish(frozenset(), {"t_a": ("pooled", 2)})  # migrated back; SwitchTenant went to another replica
    assert router.placed_tier("t_a", "bridge") == "pooled"
    router.place("t_a", "pooled")  # a late SwitchTenant agrees with the feed
    assert router.placed_tier("t_a", "bridge") == "pooled"


async def test_the_feed_is_applied_once_per_change(router, monkeypatch):
    feed = MigrationFeed()
    router.follow(feed)
    feed.publish(frozenset(), {"t_a": ("bridge", 1)})
    applied = []
    original = router._sync_feed

    def counting():
        if router._feed_version != feed.version:
            applied.append(feed.version)
        original()

    monkeypatch.setattr(router, "_sync_feed", counting)
    for _ in range(100):
        router.placed_tier("t_a", "pooled")
    feed.publish(frozenset(), {"t_a": ("bridge", 1)})  # same answer again: no new version
    router.placed_tier("t_a", "pooled")
    assert applied == [1]


async def test_the_feed_lifting_a_pause_ends_a_local_copy_pause_too(router):
    """CopyTenant paused the tenant on this replica, SwitchTenant went to another: identity's feed lifting
    the pause lifts it here too (not the 30 s lease)."""
    feed = MigrationFeed()
    router.follow(feed)
    feed.publish(frozenset({"t_a", "t_b"}), {})
    router.pause("t_a", 30)
    router.pause("t_b", 30)
    router.pause("t_c", 30)  # a copy identity did not publish: only its lease or SwitchTenant ends it
    feed.publish(frozenset({"t_b"}), {"t_a": ("pooled", 1)})
    async with router.using("t_a", "bridge"):  # served (placed pooled), not refused by the copy's pause
        pass
    assert router.paused("t_b") and router.paused("t_c")

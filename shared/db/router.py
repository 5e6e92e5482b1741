"""The tenant router: which engine (and schema) holds a tenant's rows, by region and isolation tier.

Region (data residency): each configured region has a database of its own (RegionStore); a tenant's
rows of every tier live only in its region's: pooled rows in that region's main database, its bridge
schema and silo database on that region's server. The region is the control plane's word, never
the caller's: identity's placement of the tenant (a RegionLookup, cached per tenant; one region
needs no lookup). Platform tables stay in the default region's database (see Database.session).

- pooled: the shared tables of the main database (ORM filter + RLS keep tenants apart).
- bridge: a schema of its own on Postgres (`tenant_<id>`, via schema_translate_map and a
  transaction-local search_path); a file of its own on SQLite.
- silo: a database of its own on Postgres (`<main db>_<id>`, created by the owner URL on first
  use); a file of its own on SQLite.

A bridge schema or silo database is created and migrated the first time its tenant opens a
session; the result is cached for the life of the process. `existing` and `drop` serve the
tenant lifecycle (shared/lifecycle.py): they never create a store.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import URL, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from shared.db.engine import is_sqlite, make_engine, sqlite_path
from shared.db.migrations import upgrade, version_table_for
from shared.db.rls import quote_ident
from shared.errors import FailedPrecondition, Unavailable
from shared.tenancy import PLATFORM_TENANT
from shared.tokens import MigrationFeed

TIERS = ("pooled", "bridge", "silo")
_SAFE = re.compile(r"^[a-z0-9_]+$")
_DUPLICATE_DATABASE = "42P04"
_INSUFFICIENT_PRIVILEGE = "42501"


@dataclass(frozen=True)
class Route:
    """Where one tenant's rows live."""

    bind: AsyncEngine
    """The engine a tenant session binds to (may carry a schema_translate_map)."""
    schema: str | None = None
    """The tenant's own schema (bridge on Postgres), made the search_path of its transactions."""
    region: str = ""
    """The region whose database this is ("" when the router has one region only)."""


@dataclass(frozen=True)
class RegionStore:
    """One region's database as a router needs it."""

    engine: AsyncEngine
    """Runtime engine of the region's main database (its pooled tables)."""
    url: URL
    """Runtime URL: silo databases are its siblings on the same server."""
    owner_url: URL | None = None
    """Table owner (migrations, bridge schemas, silo databases); None: the runtime URL."""
    app_role: str | None = None
    """The role granted DML in what the owner creates."""


RegionLookup = Callable[[str], Awaitable[str | tuple[str, str]]]
"""tenant id -> its region, or (region, tier), as the control plane (identity) placed it; raises when unsure.
A tier in the answer routes the tenant's requests over its token's claim (a tier migration changed it)."""

MIGRATION_PAUSE_RETRY_S = 0.2
"""The retry delay a request refused during a tenant's final migration copy is told to wait."""

FEED_PAUSE_LEASE_S = 30.0
"""How long a pause published in identity's feed holds after identity last answered (a coordinator's
CopyTenant pause lease is as long): a replica cut off from identity does not stay paused for ever."""

FEED_FIRST_WAIT_S = 5.0
"""How long a request waits for identity's first feed answer after this process started; then UNAVAILABLE
(the tenant may have been moved: routing it by its token's tier claim could write to the store it left)."""

REGION_CACHE_SIZE = 100_000
"""Tenants whose region a router remembers (a region changes only by a migration, which forgets it)."""


def tenant_slug(tenant_id: str) -> str:
    """A tenant id as a safe, lower-case SQL name part; a hash suffix keeps altered ids distinct."""
    lowered = tenant_id.lower()
    slug = re.sub(r"[^a-z0-9_]", "_", lowered)
    if slug != tenant_id or len(slug) > 40:
        slug = f"{slug[:40]}_{hashlib.sha256(tenant_id.encode()).hexdigest()[:10]}"
    return slug


def bridge_schema(tenant_id: str) -> str:
    """The Postgres schema of a bridge-tier tenant."""
    return f"tenant_{tenant_slug(tenant_id)}"


def silo_database(main_database: str, tenant_id: str) -> str:
    """The Postgres database of a silo-tier tenant (at most 63 bytes)."""
    name = f"{main_database}_{tenant_slug(tenant_id)}"
    if len(name) > 63:
        name = f"{main_database[:20]}_{hashlib.sha256(tenant_id.encode()).hexdigest()[:24]}"
    return name


class TenantRouter:
    """Maps (tenant, tier) to a Route, provisioning bridge schemas and silo databases on first use."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        url: URL,
        owner_url: URL | None,
        migrations: Path | None,
        app_role: str | None,
        engine_options: dict[str, Any] | None = None,
        region: str = "",
        others: Mapping[str, RegionStore] | None = None,
        region_of: RegionLookup | None = None,
    ) -> None:
        """`engine`/`url` are the default region's (`region`), which also holds the platform tables;
        `others` the databases of the other regions; `region_of` is asked a tenant's region when
        there are several (once per tenant and process)."""
        self._engine = engine
        self._migrations = migrations
        self._engine_options = dict(engine_options or {})
        self._default_region = region
        self._regions: dict[str, RegionStore] = {region: RegionStore(engine, url, owner_url, app_role)}
        for name, store in (others or {}).items():
            if name == region:
                raise ValueError(f"region {name!r} is the default region: its database is the main one")
            self._regions[name] = store
        if len(self._regions) > 1 and region_of is None:
            raise ValueError("several regions need a region lookup (identity's placement of each tenant)")
        self._region_of = region_of
        self._tenant_regions: OrderedDict[str, str] = OrderedDict()
        self._tenant_tiers: dict[str, str] = {}
        self._pooled = {
            name: Route(store.engine, None, name if len(self._regions) > 1 else "")
            for name, store in self._regions.items()
        }
        self._routes: dict[tuple[str, str, str], Route] = {}
        self._own_engines: list[AsyncEngine] = []
        self._locks: dict[tuple[str, str, str], asyncio.Lock] = {}
        # Live tier migration (shared/lifecycle.py): where a moved tenant lives now, whatever its
        # token's tier claim says; which tenants are paused (until a monotonic deadline, so a
        # coordinator that died never leaves one paused); requests in flight per tenant.
        self._placed: dict[str, str] = {}
        self._placed_regions: dict[str, str] = {}
        self._paused: dict[str, float] = {}
        self._in_flight: Counter[str] = Counter()
        self._idle: dict[str, asyncio.Event] = {}
        # Identity's feed (every replica polls it, shared.tokens.MigrationFeed): published pauses and
        # placements, applied when the feed's version changes (once per change, not per request).
        self._feed: MigrationFeed | None = None
        self._feed_version = -1
        self._feed_tiers: dict[str, str] = {}
        self._feed_generations: dict[str, int] = {}
        self._feed_paused: frozenset[str] = frozenset()
        self._feed_regions: dict[str, str] = {}

    def follow(self, feed: MigrationFeed | None) -> None:
        """Apply identity's published migration pauses and placements (on every replica): a paused tenant
        is refused here too, a placed tenant is routed by its placement whatever its token claims, and no
        tenant is served before the feed's first answer (see FEED_FIRST_WAIT_S)."""
        self._feed = feed
        self._feed_version = -1

    def _sync_feed(self) -> None:
        feed = self._feed
        if feed is None or feed.version == self._feed_version:
            return
        placements = feed.placements
        for tenant_id, (_, generation) in placements.items():
            if self._feed_generations.get(tenant_id) != generation:
                # Switched (or planned again) since this process heard: identity's word replaces a local
                # SwitchTenant of an earlier generation and a cached region-lookup tier.
                self._placed.pop(tenant_id, None)
                self._placed_regions.pop(tenant_id, None)
                self.forget_region(tenant_id)  # a move to another region changes identity's answer too
        self._feed_tiers = {t: tier for t, (tier, _) in placements.items() if tier in TIERS}
        self._feed_generations = {t: generation for t, (_, generation) in placements.items()}
        self._feed_regions = {t: r for t, r in feed.regions.items() if r in self._regions}
        for tenant_id in self._feed_paused - feed.paused:
            # identity lifted the pause: so does this replica, though its SwitchTenant went to another one
            self._paused.pop(tenant_id, None)
        self._feed_paused = feed.paused
        self._feed_version = feed.version

    def placed_tier(self, tenant_id: str, claimed: str) -> str:
        """The tier that routes the tenant: the migration's placement when one switched it in this process
        (since identity's feed last changed the tenant's generation), else identity's published placement,
        else identity's placement when the region lookup told it, else `claimed` (the token's tier)."""
        self._sync_feed()
        return (
            self._placed.get(tenant_id)
            or self._feed_tiers.get(tenant_id)
            or self._tenant_tiers.get(tenant_id)
            or claimed
        )

    def place(self, tenant_id: str, tier: str, region: str = "") -> None:
        """Route the tenant to `tier` (and `region`, when given) from now on, whatever tier its tokens claim
        (a migration's switch)."""
        if tier not in TIERS:
            raise ValueError(f"unknown tenant tier {tier!r}")
        if region:
            self.check_region(region)
            self._placed_regions[tenant_id] = region
            self._tenant_regions.pop(tenant_id, None)
        self._placed[tenant_id] = tier

    def check_region(self, region: str) -> str:
        """`region`, if this router has a database for it; else FailedPrecondition (REGION_NOT_CONFIGURED)."""
        if region not in self._regions:
            raise FailedPrecondition(
                f"region {region!r} has no database in this service (configured: {', '.join(self._regions)}); "
                "set BULKHEAD_REGIONS and its database URLs",
                reason="REGION_NOT_CONFIGURED",
            )
        return region

    def pause(self, tenant_id: str, seconds: float) -> None:
        """Refuse the tenant's requests (UNAVAILABLE, TENANT_MIGRATING) for up to `seconds` (or until identity's
        feed, when followed, lifts the pause it published)."""
        self._sync_feed()
        self._paused[tenant_id] = time.monotonic() + seconds

    def resume(self, tenant_id: str) -> None:
        """Serve the tenant's requests again."""
        self._paused.pop(tenant_id, None)

    def paused(self, tenant_id: str) -> bool:
        """Whether the tenant's requests are refused now: paused in this process (CopyTenant), or published
        paused in identity's feed (heard within FEED_PAUSE_LEASE_S)."""
        feed = self._feed
        if feed is not None and tenant_id in feed.paused and feed.age() < FEED_PAUSE_LEASE_S:
            return True
        until = self._paused.get(tenant_id)
        if until is None:
            return False
        if time.monotonic() >= until:
            self._paused.pop(tenant_id, None)
            return False
        return True

    async def drain(self, tenant_id: str, timeout: float) -> bool:
        """Wait until none of the tenant's transactions is in flight; False on timeout."""
        deadline = time.monotonic() + timeout
        while self._in_flight[tenant_id] > 0:
            event = self._idle.setdefault(tenant_id, asyncio.Event())
            event.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return False
        self._in_flight.pop(tenant_id, None)
        return True

    def _admit(self, tenant_id: str) -> None:
        if self.paused(tenant_id):
            raise Unavailable(
                "the tenant is moving to another isolation tier; retry shortly",
                reason="TENANT_MIGRATING",
                retry_after=MIGRATION_PAUSE_RETRY_S,
            )

    @asynccontextmanager
    async def using(self, tenant_id: str, tier: str) -> AsyncIterator[Route]:
        """The tenant's Route for one transaction: refused while a migration pauses the tenant, routed by
        the migration's placement over the token's claim, and counted in flight until it ends."""
        if self._feed is not None and not self._feed.loaded and not await self._feed.wait_loaded(FEED_FIRST_WAIT_S):
            raise Unavailable(
                "this replica has not heard identity's tenant placements yet; retry shortly",
                reason="TENANT_TIER_UNAVAILABLE",
                retry_after=1.0,
            )
        self._sync_feed()
        self._admit(tenant_id)
        await self.region_of(tenant_id)  # with several regions: also identity's tier of the tenant
        route = await self.route(tenant_id, self.placed_tier(tenant_id, tier))
        self._admit(tenant_id)  # paused while the route was being resolved
        self._in_flight[tenant_id] += 1
        try:
            yield route
        finally:
            self._in_flight[tenant_id] -= 1
            if self._in_flight[tenant_id] <= 0:
                self._in_flight.pop(tenant_id, None)
                event = self._idle.get(tenant_id)
                if event is not None:
                    event.set()

    @property
    def regions(self) -> tuple[str, ...]:
        """The regions this router has a database for, default first."""
        return tuple(self._regions)

    @property
    def stores(self) -> dict[str, RegionStore]:
        """Every region's main database (engine, URLs, runtime role), default first: for code that keeps
        tenant rows in the region's main database whatever the tier, and migrates it there."""
        return dict(self._regions)

    @property
    def default_region(self) -> str:
        """The region of the main engine (and of the platform tables)."""
        return self._default_region

    async def region_of(self, tenant_id: str) -> str:
        """The tenant's region: the default with one region (no lookup), else the region a migration switched
        it to in this process, else identity's placement (asked again once identity's feed says the tenant
        was switched: a move to another region).

        FailedPrecondition when this service has no database for it (a region missing from its config)."""
        if len(self._regions) == 1 or tenant_id == PLATFORM_TENANT:
            return self._default_region
        self._sync_feed()
        region = (
            self._placed_regions.get(tenant_id)
            or self._feed_regions.get(tenant_id)
            or self._tenant_regions.get(tenant_id)
        )
        if region is None:
            assert self._region_of is not None
            answer = await self._region_of(tenant_id)
            region, tier = answer if isinstance(answer, tuple) else (answer, "")
            if region not in self._regions:
                raise FailedPrecondition(
                    f"the tenant's region {region!r} has no database in this service (configured: "
                    f"{', '.join(self._regions)}); set BULKHEAD_REGIONS and its database URLs",
                    reason="REGION_NOT_CONFIGURED",
                )
            self._tenant_regions[tenant_id] = region
            if tier in TIERS:
                self._tenant_tiers[tenant_id] = tier
            if len(self._tenant_regions) > REGION_CACHE_SIZE:
                forgotten, _ = self._tenant_regions.popitem(last=False)
                self._tenant_tiers.pop(forgotten, None)
        return region

    def forget_region(self, tenant_id: str) -> None:
        """Drop the cached region of a tenant (after a move to another region: the next call asks again)."""
        self._tenant_regions.pop(tenant_id, None)
        self._tenant_tiers.pop(tenant_id, None)

    async def _region(self, tenant_id: str, region: str | None) -> str:
        return self.check_region(region) if region else await self.region_of(tenant_id)

    async def main_route(self, tenant_id: str, region: str | None = None) -> Route:
        """The main database of the tenant's region (its pooled rows), whatever its tier; `region` names
        another region's (a migration to or from there)."""
        return self._pooled[await self._region(tenant_id, region)]

    async def route(self, tenant_id: str, tier: str, region: str | None = None) -> Route:
        """The Route for a tenant of `tier` in its region, or in `region` (a migration's other side)."""
        if tier not in TIERS and tier:
            raise ValueError(f"unknown tenant tier {tier!r}")
        region = await self._region(tenant_id, region)
        if tier == "pooled" or not tier:
            return self._pooled[region]
        key = (region, tier, tenant_id)
        route = self._routes.get(key)
        if route is not None:
            return route
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            route = self._routes.get(key)
            if route is None:
                route = await self._provision(self._regions[region], tenant_id, tier)
                route = Route(route.bind, route.schema, self._pooled[region].region)
                self._routes[key] = route
        return route

    def store_name(self, tenant_id: str, tier: str, region: str | None = None) -> str | None:
        """The tenant's own store ("schema:x", "database:x", "file:x") in `region` (default: the default
        region), None for a pooled tenant. Another region's store is prefixed with it ("eu/schema:x")."""
        if tier == "pooled" or not tier:
            return None
        if tier not in TIERS:
            raise ValueError(f"unknown tenant tier {tier!r}")
        store = self._regions[region or self._default_region]
        prefix = f"{region}/" if region and region != self._default_region else ""
        if is_sqlite(store.url):
            return f"{prefix}file:{self._sqlite_file(store, tenant_id).name}"
        if tier == "bridge":
            return f"{prefix}schema:{bridge_schema(tenant_id)}"
        return f"{prefix}database:{silo_database(store.url.database or 'bulkhead', tenant_id)}"

    async def existing(self, tenant_id: str, tier: str, region: str | None = None) -> Route | None:
        """The tenant's Route (in its region, or in `region`) if its store exists already, else None: counting
        or purging never creates one."""
        region = await self._region(tenant_id, region)
        name = self.store_name(tenant_id, tier, region)
        if name is None:
            return self._pooled[region]
        if (region, tier, tenant_id) in self._routes:
            return self._routes[(region, tier, tenant_id)]
        if not await self._store_exists(self._regions[region], tenant_id, tier):
            return None
        return await self.route(tenant_id, tier, region)

    async def drop(
        self, tenant_id: str, tier: str, region: str | None = None, *, tables: Sequence[str] = ()
    ) -> str | None:
        """Drop this service's part of the tenant's own store (bridge schema, silo database, SQLite file) in its
        region, or in `region`; the store's name, or None when this service had nothing there. Idempotent;
        the pooled tier has no store of its own.

        Services may share one database (`bulkhead up --postgres`: one URL, per-service tables and version
        tables), and then a tenant's bridge schema or silo database holds every service's tables. So on
        Postgres only `tables` (this service's) and its migrations' version table are dropped, and the schema
        or database itself only once no other service's table is left in it (without `tables`: the whole
        store, as when every service has a database of its own)."""
        region = await self._region(tenant_id, region)
        store = self._regions[region]
        name = self.store_name(tenant_id, tier, region)
        if name is None or not await self._store_exists(store, tenant_id, tier):
            return None
        # Forget and close this process's engine first: no pooled connection may outlive the store.
        for key in [k for k in self._routes if k[2] == tenant_id and k[0] == region]:
            route = self._routes.pop(key)
            if route.bind in self._own_engines:
                self._own_engines.remove(route.bind)
                await route.bind.dispose()
        if is_sqlite(store.url):  # a file per service and tenant: <service db>.tenants/<tenant>.db
            path = self._sqlite_file(store, tenant_id)
            for suffix in ("", "-wal", "-shm", "-journal"):
                path.with_name(path.name + suffix).unlink(missing_ok=True)
            return name
        kind, _, ident = name.rpartition("/")[2].partition(":")
        owner = store.owner_url or store.url
        mine = [*tables, *([version_table_for(self._migrations)] if self._migrations and tables else [])]
        # The tables of this service: in the bridge schema, or in the silo database's own (default) schema.
        inside = owner if kind == "schema" else owner.set(database=ident)
        schema = ident if kind == "schema" else None
        left = await self._drop_tables(inside, schema, mine) if mine else 0
        if left:
            return name  # another service's part is still there: the store stays theirs (its last one drops it)
        # FORCE ends other replicas' connections to the silo database (Postgres 13+).
        sql = (
            f"DROP SCHEMA IF EXISTS {quote_ident(ident)} CASCADE"
            if kind == "schema"
            else f"DROP DATABASE IF EXISTS {quote_ident(ident)} WITH (FORCE)"
        )
        admin = create_async_engine(owner, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        try:
            async with admin.connect() as conn:
                await conn.exec_driver_sql(sql)
        except DBAPIError as exc:
            if getattr(exc.orig, "pgcode", None) != _INSUFFICIENT_PRIVILEGE:
                raise
            raise FailedPrecondition(
                f"cannot drop {name}: role {owner.username!r} may not end the other sessions in it; "
                f"GRANT pg_signal_backend TO {owner.username} (deploy/postgres/init-databases.sh does), then retry",
            ) from None
        finally:
            await admin.dispose()
        return name

    @staticmethod
    async def _drop_tables(url: URL, schema: str | None, tables: Sequence[str]) -> int:
        """Drop `tables` in `schema` (None: the database's own) of `url`'s database in one transaction; how many
        other services' parts are left there (their migrations' version tables)."""
        engine = create_async_engine(url, poolclass=NullPool)
        try:
            async with engine.begin() as conn:
                where = quote_ident(schema) + "." if schema else ""
                for table in tables:
                    await conn.exec_driver_sql(f"DROP TABLE IF EXISTS {where}{quote_ident(table)} CASCADE")
                return int(
                    await conn.scalar(
                        text(
                            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                            "WHERE c.relkind = 'r' AND c.relname LIKE 'alembic\\_version\\_%' "
                            "AND (n.nspname = :s "
                            "OR (:s = '' AND n.nspname NOT IN ('pg_catalog', 'information_schema')))"
                        ),
                        {"s": schema or ""},
                    )
                    or 0
                )
        finally:
            await engine.dispose()

    async def _store_exists(self, store: RegionStore, tenant_id: str, tier: str) -> bool:
        """Whether this service has its part of the tenant's store: the file; on Postgres, its migrations'
        version table in the bridge schema or the silo database (which other services may share)."""
        if is_sqlite(store.url):
            return self._sqlite_file(store, tenant_id).exists()
        version = version_table_for(self._migrations) if self._migrations else None
        if tier == "bridge":
            schema = bridge_schema(tenant_id)
            async with store.engine.connect() as conn:
                if version is None:
                    return bool(await conn.scalar(text("SELECT 1 FROM pg_namespace WHERE nspname = :n"), {"n": schema}))
                return bool(
                    await conn.scalar(
                        text("SELECT to_regclass(:t) IS NOT NULL"),
                        {"t": f"{quote_ident(schema)}.{quote_ident(version)}"},
                    )
                )
        name = silo_database(store.url.database or "bulkhead", tenant_id)
        async with store.engine.connect() as conn:
            if not await conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}):
                return False
        if version is None:
            return True
        engine = create_async_engine((store.owner_url or store.url).set(database=name), poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                return bool(await conn.scalar(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": quote_ident(version)}))
        except DBAPIError:  # dropped meanwhile
            return False
        finally:
            await engine.dispose()

    @staticmethod
    def _sqlite_file(store: RegionStore, tenant_id: str) -> Path:
        main = sqlite_path(store.url)
        return main.parent / f"{main.stem}.tenants" / f"{tenant_slug(tenant_id)}.db"

    async def _provision(self, store: RegionStore, tenant_id: str, tier: str) -> Route:
        if self._migrations is None:
            raise RuntimeError(f"the {tier} tier needs migrations to build the tenant's tables")
        if is_sqlite(store.url):
            return await self._own_sqlite_file(store, tenant_id, self._migrations)
        owner = store.owner_url or store.url
        if tier == "bridge":
            schema = bridge_schema(tenant_id)
            await asyncio.to_thread(upgrade, owner, self._migrations, schema, app_role=store.app_role)
            return Route(store.engine.execution_options(schema_translate_map={None: schema}), schema)
        return await self._own_postgres_database(store, tenant_id, self._migrations)

    async def _own_sqlite_file(self, store: RegionStore, tenant_id: str, migrations: str | Path) -> Route:
        path = self._sqlite_file(store, tenant_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        url = store.url.set(database=str(path))
        await asyncio.to_thread(upgrade, url, migrations)
        return Route(self._own(make_engine(url, **self._engine_options)))

    async def _own_postgres_database(self, store: RegionStore, tenant_id: str, migrations: str | Path) -> Route:
        name = silo_database(store.url.database or "bulkhead", tenant_id)
        owner = store.owner_url or store.url
        await self._create_database(owner, store.app_role, name)
        await asyncio.to_thread(upgrade, owner.set(database=name), migrations, app_role=store.app_role)
        return Route(self._own(make_engine(store.url.set(database=name), **self._engine_options)))

    @staticmethod
    async def _create_database(owner_url: URL, app_role: str | None, name: str) -> None:
        admin = create_async_engine(owner_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        try:
            async with admin.connect() as conn:
                exists = await conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name})
                if exists:
                    return
                try:
                    await conn.exec_driver_sql(f"CREATE DATABASE {quote_ident(name)}")
                except DBAPIError as exc:  # another replica won the race
                    if getattr(exc.orig, "pgcode", None) != _DUPLICATE_DATABASE:
                        raise
                    return
                if app_role:
                    # Only the runtime role may connect, not every role on the cluster.
                    await conn.exec_driver_sql(f"REVOKE ALL ON DATABASE {quote_ident(name)} FROM PUBLIC")
                    await conn.exec_driver_sql(
                        f"GRANT CONNECT, TEMPORARY ON DATABASE {quote_ident(name)} TO {quote_ident(app_role)}"
                    )
        finally:
            await admin.dispose()

    def _own(self, engine: AsyncEngine) -> AsyncEngine:
        self._own_engines.append(engine)
        return engine

    async def close(self) -> None:
        """Dispose of the engines opened for silo (and SQLite bridge) tenants and other regions' main engines."""
        engines, self._own_engines = self._own_engines, []
        engines += [store.engine for name, store in self._regions.items() if name != self._default_region]
        self._routes.clear()
        for engine in engines:
            await engine.dispose()

"""Database: the one object a service holds for persistence (engine, migrations, sessions)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import URL, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from shared.db.engine import is_sqlite, make_engine, normalize_url, sqlite_path
from shared.db.migrations import upgrade
from shared.db.raw import RawTransaction, raw_transaction
from shared.db.replica import INSERT_LSN, ReplicaRoutes, format_lsn, required_lsn
from shared.db.router import RegionLookup, RegionStore, Route, TenantRouter
from shared.db.session import PLATFORM_BIND_KEY, SEARCH_PATH_KEY, SYSTEM_KEY, TENANT_KEY, TenantSession
from shared.errors import Unavailable
from shared.tenancy import require_tenant

log = logging.getLogger("bulkhead.db")

REPLICA_RETRY_S = 5.0
"""After the replica could not be reached, reads go to the primary for this long before it is tried again."""

# One round trip on the replica: replayed far enough, and the bridge schema (if any) is there.
_REPLICA_READY = text(
    "SELECT COALESCE(pg_last_wal_replay_lsn() >= CAST(CAST(:lsn AS text) AS pg_lsn), NOT pg_is_in_recovery()) "
    "AND (CAST(:schema AS text) IS NULL OR to_regnamespace(CAST(:schema AS text)) IS NOT NULL)"
)


async def _open_region(database: Any, folder: Path | None, engine_options: dict[str, Any]) -> RegionStore:
    """Another region's database: migrated to head (as its owner), and an engine as the runtime role."""
    runtime = normalize_url(database.url)
    owner = normalize_url(database.owner_url) if getattr(database, "owner_url", None) else None
    app_role = None
    if is_sqlite(runtime):
        sqlite_path(runtime).parent.mkdir(parents=True, exist_ok=True)
    elif owner is not None and owner.username != runtime.username:
        app_role = runtime.username
    if folder is not None:
        await asyncio.to_thread(upgrade, owner or runtime, folder, app_role=app_role)
    return RegionStore(make_engine(runtime, **engine_options), runtime, owner, app_role)


class Database:
    """A service's database: tenant-bound sessions, platform sessions, and the tier router.

    Build it with `await Database.open(...)`; the constructor is for tests that bring an engine.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        router: TenantRouter | None = None,
        replica: ReplicaRoutes | None = None,
        read_wait: float = 0.05,
    ) -> None:
        self._engine = engine
        self._replica = replica
        self._read_wait = read_wait
        self._replica_down_until = 0.0
        self._router = router or TenantRouter(engine, url=engine.url, owner_url=None, migrations=None, app_role=None)
        self._sessions = async_sessionmaker(sync_session_class=TenantSession, expire_on_commit=False)
        self._closers: list[Any] = []

    @classmethod
    async def open(
        cls,
        url: str | URL,
        *,
        migrations: str | Path | None = None,
        owner_url: str | URL | None = None,
        app_role: str | None = None,
        read_url: str | URL | None = None,
        read_wait: float = 0.05,
        regions: Mapping[str, Any] | None = None,
        region_of: RegionLookup | None = None,
        **engine_options: Any,
    ) -> Database:
        """Connect to `url`, migrating it to head first when `migrations` names an Alembic folder.

        `owner_url` (Postgres) is the role that owns the tables: migrations run as it, and it
        creates silo databases. `url` is then the runtime role, which is granted DML only
        (`app_role` overrides the role granted to; it defaults to `url`'s user).
        `read_url` (Postgres) is a streaming replica of the same cluster, as the runtime role:
        read_session() reads there (shared.db.replica), waiting at most `read_wait` seconds for
        it to catch up with a write the caller must see before reading on the primary instead.
        `regions` (data residency) maps every region, the default first, to its database (objects
        with `url` and `owner_url`, shared.config.RegionDatabase): `url` is the default region's
        (its entry there is not used again); each other region's database is migrated here too, and
        a tenant's rows go to its region's, asked of `region_of` (identity's placement). The
        replica serves the default region only; platform tables live in the default region's.
        Extra keyword arguments go to create_async_engine (pool_size, echo, ...).
        """
        runtime = normalize_url(url)
        owner = normalize_url(owner_url) if owner_url is not None else None
        read = normalize_url(read_url) if read_url is not None else None
        if read is not None and (is_sqlite(runtime) or is_sqlite(read)):
            raise ValueError("a read replica needs Postgres for both the database and the replica URL")
        if is_sqlite(runtime):
            sqlite_path(runtime).parent.mkdir(parents=True, exist_ok=True)
        elif app_role is None and owner is not None and owner.username != runtime.username:
            app_role = runtime.username
        folder = Path(migrations) if migrations is not None else None
        if folder is not None:
            await asyncio.to_thread(upgrade, owner or runtime, folder, app_role=app_role)
        regions = regions or {}
        names = list(regions)
        others: dict[str, RegionStore] = {}
        try:
            for name in names[1:]:
                others[name] = await _open_region(regions[name], folder, engine_options)
            engine = make_engine(runtime, **engine_options)
        except BaseException:
            for store in others.values():
                await store.engine.dispose()
            raise
        router = TenantRouter(
            engine,
            url=runtime,
            owner_url=owner,
            migrations=folder,
            app_role=app_role,
            engine_options=engine_options,
            region=names[0] if names else "",
            others=others,
            region_of=region_of,
        )
        replica = ReplicaRoutes(make_engine(read, **engine_options), read, engine_options) if read else None
        return cls(engine, router=router, replica=replica, read_wait=read_wait)

    @property
    def engine(self) -> AsyncEngine:
        """The main (pooled-tier, platform tables) engine."""
        return self._engine

    @property
    def router(self) -> TenantRouter:
        """The tier router (the tenant lifecycle finds and drops tenants' own stores through it)."""
        return self._router

    @property
    def regions(self) -> tuple[str, ...]:
        """The regions this service has a database for, default first (one for a single-region deployment)."""
        return self._router.regions

    @property
    def dialect(self) -> str:
        """`postgresql` or `sqlite`."""
        return self._engine.dialect.name

    async def region_of(self, tenant_id: str) -> str:
        """The tenant's region (identity's placement; the default region when there is only one)."""
        return await self._router.region_of(tenant_id)

    async def route(self) -> Route:
        """Where the current tenant's rows live (provisioning its schema/database on first use)."""
        ctx = require_tenant()
        return await self._router.route(ctx.tenant_id, self._router.placed_tier(ctx.tenant_id, ctx.tier))

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A transaction confined to the current tenant; commits on exit, rolls back on error.

        Raises NoTenantContext without a TenantContext. On Postgres every transaction of the
        session starts with `set_config('app.tenant_id', <tenant>, true)` for RLS. Platform tables
        go to the platform database whatever the tenant's tier (see TenantSession.get_bind).
        """
        ctx = require_tenant()
        async with self._router.using(ctx.tenant_id, ctx.tier) as route:  # paused / moved by a tier migration
            info: dict[str, Any] = {TENANT_KEY: ctx.tenant_id}
            if route.schema:
                info[SEARCH_PATH_KEY] = route.schema
            if route.bind is not self._engine:
                info[PLATFORM_BIND_KEY] = self._engine.sync_engine
            async with self._sessions(bind=route.bind, info=info) as session:
                yield session  # an error propagates from here: closing the session rolls back
                await session.commit()

    @property
    def has_replica(self) -> bool:
        """Whether reads may go to a streaming replica (a read URL was given)."""
        return self._replica is not None

    @asynccontextmanager
    async def read_session(self) -> AsyncIterator[AsyncSession]:
        """A tenant session for reads only: on the replica when there is one and it has replayed the
        LSN the caller asked for (shared.db.replica.reading_after), else exactly session().

        Nothing may be written through it (a standby refuses writes). The replica's transaction
        sets app.tenant_id like any other, so RLS confines it the same way.
        """
        ctx = require_tenant()
        async with self._router.using(ctx.tenant_id, ctx.tier) as primary:  # paused / moved by a tier migration
            pass
        session = None
        home = primary.region in ("", self._router.default_region)  # the replica is the default region's
        if self._replica is not None and home and time.monotonic() >= self._replica_down_until:
            route = self._replica.route(primary, self._engine)
            info: dict[str, Any] = {TENANT_KEY: ctx.tenant_id}
            if route.schema:
                info[SEARCH_PATH_KEY] = route.schema
            if route.bind is not self._replica.engine:
                info[PLATFORM_BIND_KEY] = self._replica.engine.sync_engine
            session = self._sessions(bind=route.bind, info=info)
            try:
                ready = await self._replica_ready(session, route.schema)
            except BaseException:  # cancelled: hand the connection back all the same
                await session.close()
                raise
            if not ready:
                await session.close()
                session = None
        if session is None:
            async with self.session() as primary_session:
                yield primary_session
            return
        async with session:
            yield session  # an error propagates from here: closing the session rolls back
            await session.commit()

    async def _replica_ready(self, session: AsyncSession, schema: str | None) -> bool:
        """Whether the replica may serve this read: caught up within read_wait, and reachable."""
        lsn = required_lsn()
        params = {"lsn": format_lsn(lsn or 0), "schema": schema}
        deadline = time.monotonic() + self._read_wait
        try:
            while not await session.scalar(_REPLICA_READY, params):
                if time.monotonic() >= deadline:
                    return False
                await asyncio.sleep(0.002)
        except Unavailable:  # down: leave it alone for a while rather than wait on it at every read
            self._replica_down_until = time.monotonic() + REPLICA_RETRY_S
            log.warning("read replica unreachable; reading on the primary for %.0f s", REPLICA_RETRY_S, exc_info=True)
            return False
        except Exception:  # e.g. a silo database the standby lacks: the primary answers this read
            log.warning("read replica cannot serve this read; reading on the primary", exc_info=True)
            return False
        return True

    async def written_lsn(self) -> str | None:
        """After a write committed: a WAL position at or past it, for the caller's next read
        (None without a replica, where every read is on the primary anyway)."""
        if self._replica is None:
            return None
        async with self._engine.connect() as conn:
            return (await conn.exec_driver_sql(INSERT_LSN)).scalar()

    @asynccontextmanager
    async def raw(self, *, write: bool = False) -> AsyncIterator[RawTransaction]:
        """A raw transaction for the current tenant's hot path (see shared.db.raw): no ORM, and
        on Postgres still under RLS for this tenant. Raises NoTenantContext without a TenantContext."""
        ctx = require_tenant()
        # Paused / moved by a tier migration, like session().
        async with (
            self._router.using(ctx.tenant_id, ctx.tier) as route,
            raw_transaction(route.bind, tenant_id=ctx.tenant_id, schema=route.schema, write=write) as tx,
        ):
            yield tx

    @asynccontextmanager
    async def system_session(self, region: str | None = None) -> AsyncIterator[AsyncSession]:
        """A transaction for platform tables; touching any tenant-owned table raises NoTenantContext.

        `region`: in that region's main database instead of the default one's (a platform table that keeps
        tenants' metadata in their own region, e.g. credentials' schedule; a worker reads each of db.regions)."""
        bind = self._engine
        if region and region != self._router.default_region:
            bind = self._router.stores[region].engine  # KeyError: a region this service has no database for
        async with self._sessions(bind=bind, info={SYSTEM_KEY: True}) as session:
            yield session  # an error propagates from here: closing the session rolls back
            await session.commit()

    def on_close(self, closer: Any) -> None:
        """Await `closer()` when the database closes (what was opened with it, e.g. the placement lookup's channel)."""
        self._closers.append(closer)

    async def close(self) -> None:
        """Dispose of every engine (main, other regions', those opened for silo tenants)."""
        closers, self._closers = self._closers, []
        for closer in closers:
            await closer()
        await self._router.close()
        if self._replica is not None:
            await self._replica.close()
        await self._engine.dispose()

"""Database: the one object a service holds for persistence (engine, migrations, sessions)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from shared.db.engine import is_sqlite, make_engine, normalize_url, sqlite_path
from shared.db.migrations import upgrade
from shared.db.raw import RawTransaction, raw_transaction
from shared.db.router import Route, TenantRouter
from shared.db.session import PLATFORM_BIND_KEY, SEARCH_PATH_KEY, SYSTEM_KEY, TENANT_KEY, TenantSession
from shared.tenancy import require_tenant


class Database:
    """A service's database: tenant-bound sessions, platform sessions, and the tier router.

    Build it with `await Database.open(...)`; the constructor is for tests that bring an engine.
    """

    def __init__(self, engine: AsyncEngine, *, router: TenantRouter | None = None) -> None:
        self._engine = engine
        self._router = router or TenantRouter(engine, url=engine.url, owner_url=None, migrations=None,
                                              app_role=None)
        self._sessions = async_sessionmaker(sync_session_class=TenantSession, expire_on_commit=False)

    @classmethod
    async def open(cls, url: str | URL, *, migrations: str | Path | None = None, owner_url: str | URL | None = None,
                   app_role: str | None = None, **engine_options: Any) -> Database:
        """Connect to `url`, migrating it to head first when `migrations` names an Alembic folder.

        `owner_url` (Postgres) is the role that owns the tables: migrations run as it, and it
        creates silo databases. `url` is then the runtime role, which is granted DML only
        (`app_role` overrides the role granted to; it defaults to `url`'s user).
        Extra keyword arguments go to create_async_engine (pool_size, echo, ...).
        """
        runtime = normalize_url(url)
        owner = normalize_url(owner_url) if owner_url is not None else None
        if is_sqlite(runtime):
            sqlite_path(runtime).parent.mkdir(parents=True, exist_ok=True)
        elif app_role is None and owner is not None and owner.username != runtime.username:
            app_role = runtime.username
        folder = Path(migrations) if migrations is not None else None
        if folder is not None:
            await asyncio.to_thread(upgrade, owner or runtime, folder, app_role=app_role)
        engine = make_engine(runtime, **engine_options)
        router = TenantRouter(engine, url=runtime, owner_url=owner, migrations=folder, app_role=app_role,
                              engine_options=engine_options)
        return cls(engine, router=router)

    @property
    def engine(self) -> AsyncEngine:
        """The main (pooled-tier, platform tables) engine."""
        return self._engine

    @property
    def router(self) -> TenantRouter:
        """The tier router (the tenant lifecycle finds and drops tenants' own stores through it)."""
        return self._router

    @property
    def dialect(self) -> str:
        """`postgresql` or `sqlite`."""
        return self._engine.dialect.name

    async def route(self) -> Route:
        """Where the current tenant's rows live (provisioning its schema/database on first use)."""
        ctx = require_tenant()
        return await self._router.route(ctx.tenant_id, ctx.tier)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A transaction confined to the current tenant; commits on exit, rolls back on error.

        Raises NoTenantContext without a TenantContext. On Postgres every transaction of the
        session starts with `set_config('app.tenant_id', <tenant>, true)` for RLS. Platform tables
        go to the platform database whatever the tenant's tier (see TenantSession.get_bind).
        """
        ctx = require_tenant()
        route = await self._router.route(ctx.tenant_id, ctx.tier)
        info: dict[str, Any] = {TENANT_KEY: ctx.tenant_id}
        if route.schema:
            info[SEARCH_PATH_KEY] = route.schema
        if route.bind is not self._engine:
            info[PLATFORM_BIND_KEY] = self._engine.sync_engine
        async with self._sessions(bind=route.bind, info=info) as session:
            yield session  # an error propagates from here: closing the session rolls back
            await session.commit()

    @asynccontextmanager
    async def raw(self, *, write: bool = False) -> AsyncIterator[RawTransaction]:
        """A raw transaction for the current tenant's hot path (see shared.db.raw): no ORM, and
        on Postgres still under RLS for this tenant. Raises NoTenantContext without a TenantContext."""
        ctx = require_tenant()
        route = await self._router.route(ctx.tenant_id, ctx.tier)
        async with raw_transaction(route.bind, tenant_id=ctx.tenant_id, schema=route.schema, write=write) as tx:
            yield tx

    @asynccontextmanager
    async def system_session(self) -> AsyncIterator[AsyncSession]:
        """A transaction for platform tables; touching any tenant-owned table raises NoTenantContext."""
        async with self._sessions(bind=self._engine, info={SYSTEM_KEY: True}) as session:
            yield session  # an error propagates from here: closing the session rolls back
            await session.commit()

    async def close(self) -> None:
        """Dispose of every engine (main, and those opened for silo tenants)."""
        await self._router.close()
        await self._engine.dispose()

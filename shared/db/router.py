"""The tenant router: which engine (and schema) holds a tenant's rows, by isolation tier.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import URL, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from shared.db.engine import is_sqlite, make_engine, sqlite_path
from shared.db.migrations import upgrade
from shared.db.rls import quote_ident

TIERS = ("pooled", "bridge", "silo")
_SAFE = re.compile(r"^[a-z0-9_]+$")
_DUPLICATE_DATABASE = "42P04"


@dataclass(frozen=True)
class Route:
    """Where one tenant's rows live."""

    bind: AsyncEngine
    """The engine a tenant session binds to (may carry a schema_translate_map)."""
    schema: str | None = None
    """The tenant's own schema (bridge on Postgres), made the search_path of its transactions."""


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

    def __init__(self, engine: AsyncEngine, *, url: URL, owner_url: URL | None, migrations: Path | None,
                 app_role: str | None, engine_options: dict[str, Any] | None = None) -> None:
        self._engine = engine
        self._url = url
        self._owner_url = owner_url or url
        self._migrations = migrations
        self._app_role = app_role
        self._engine_options = dict(engine_options or {})
        self._pooled = Route(engine)
        self._routes: dict[tuple[str, str], Route] = {}
        self._own_engines: list[AsyncEngine] = []
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def route(self, tenant_id: str, tier: str) -> Route:
        """The Route for a tenant of `tier` (pooled unless the token says otherwise)."""
        if tier == "pooled" or not tier:
            return self._pooled
        if tier not in TIERS:
            raise ValueError(f"unknown tenant tier {tier!r}")
        key = (tier, tenant_id)
        route = self._routes.get(key)
        if route is not None:
            return route
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            route = self._routes.get(key)
            if route is None:
                route = await self._provision(tenant_id, tier)
                self._routes[key] = route
        return route

    def store_name(self, tenant_id: str, tier: str) -> str | None:
        """The tenant's own store ("schema:x", "database:x", "file:x"), None for a pooled tenant."""
        if tier == "pooled" or not tier:
            return None
        if tier not in TIERS:
            raise ValueError(f"unknown tenant tier {tier!r}")
        if is_sqlite(self._url):
            return f"file:{self._sqlite_file(tenant_id).name}"
        if tier == "bridge":
            return f"schema:{bridge_schema(tenant_id)}"
        return f"database:{silo_database(self._url.database or 'bulkhead', tenant_id)}"

    async def existing(self, tenant_id: str, tier: str) -> Route | None:
        """The tenant's Route if its store exists already, else None: counting or purging never creates one."""
        name = self.store_name(tenant_id, tier)
        if name is None:
            return self._pooled
        if (tier, tenant_id) in self._routes:
            return self._routes[(tier, tenant_id)]
        if not await self._store_exists(tenant_id, tier):
            return None
        return await self.route(tenant_id, tier)

    async def drop(self, tenant_id: str, tier: str) -> str | None:
        """Drop the tenant's own store (bridge schema, silo database, SQLite file); its name, or None
        when there was none. Idempotent; the pooled tier has no store of its own."""
        name = self.store_name(tenant_id, tier)
        if name is None or not await self._store_exists(tenant_id, tier):
            return None
        # Forget and close this process's engine first: no pooled connection may outlive the store.
        for key in [k for k in self._routes if k[1] == tenant_id]:
            route = self._routes.pop(key)
            if route.bind in self._own_engines:
                self._own_engines.remove(route.bind)
                await route.bind.dispose()
        if is_sqlite(self._url):
            path = self._sqlite_file(tenant_id)
            for suffix in ("", "-wal", "-shm", "-journal"):
                path.with_name(path.name + suffix).unlink(missing_ok=True)
            return name
        kind, _, ident = name.partition(":")
        # FORCE ends other replicas' connections to the silo database (Postgres 13+).
        sql = (f"DROP SCHEMA IF EXISTS {quote_ident(ident)} CASCADE" if kind == "schema"
               else f"DROP DATABASE IF EXISTS {quote_ident(ident)} WITH (FORCE)")
        admin = create_async_engine(self._owner_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        try:
            async with admin.connect() as conn:
                await conn.exec_driver_sql(sql)
        finally:
            await admin.dispose()
        return name

    async def _store_exists(self, tenant_id: str, tier: str) -> bool:
        if is_sqlite(self._url):
            return self._sqlite_file(tenant_id).exists()
        if tier == "bridge":
            sql, name = "SELECT 1 FROM pg_namespace WHERE nspname = :name", bridge_schema(tenant_id)
        else:
            sql, name = ("SELECT 1 FROM pg_database WHERE datname = :name",
                         silo_database(self._url.database or "bulkhead", tenant_id))
        async with self._engine.connect() as conn:
            return bool(await conn.scalar(text(sql), {"name": name}))

    def _sqlite_file(self, tenant_id: str) -> Path:
        main = sqlite_path(self._url)
        return main.parent / f"{main.stem}.tenants" / f"{tenant_slug(tenant_id)}.db"

    async def _provision(self, tenant_id: str, tier: str) -> Route:
        if self._migrations is None:
            raise RuntimeError(f"the {tier} tier needs migrations to build the tenant's tables")
        if is_sqlite(self._url):
            return await self._own_sqlite_file(tenant_id)
        if tier == "bridge":
            schema = bridge_schema(tenant_id)
            await asyncio.to_thread(upgrade, self._owner_url, self._migrations, schema, app_role=self._app_role)
            return Route(self._engine.execution_options(schema_translate_map={None: schema}), schema)
        return await self._own_postgres_database(tenant_id)

    async def _own_sqlite_file(self, tenant_id: str) -> Route:
        path = self._sqlite_file(tenant_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        url = self._url.set(database=str(path))
        await asyncio.to_thread(upgrade, url, self._migrations)
        return Route(self._own(make_engine(url, **self._engine_options)))

    async def _own_postgres_database(self, tenant_id: str) -> Route:
        name = silo_database(self._url.database or "bulkhead", tenant_id)
        await self._create_database(name)
        await asyncio.to_thread(upgrade, self._owner_url.set(database=name), self._migrations,
                                app_role=self._app_role)
        return Route(self._own(make_engine(self._url.set(database=name), **self._engine_options)))

    async def _create_database(self, name: str) -> None:
        admin = create_async_engine(self._owner_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
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
                if self._app_role:
                    # Only the runtime role may connect, not every role on the cluster.
                    await conn.exec_driver_sql(f"REVOKE ALL ON DATABASE {quote_ident(name)} FROM PUBLIC")
                    await conn.exec_driver_sql(
                        f"GRANT CONNECT, TEMPORARY ON DATABASE {quote_ident(name)} TO {quote_ident(self._app_role)}")
        finally:
            await admin.dispose()

    def _own(self, engine: AsyncEngine) -> AsyncEngine:
        self._own_engines.append(engine)
        return engine

    async def close(self) -> None:
        """Dispose of the engines opened for silo (and SQLite bridge) tenants."""
        engines, self._own_engines = self._own_engines, []
        self._routes.clear()
        for engine in engines:
            await engine.dispose()

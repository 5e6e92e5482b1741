"""The tenant router: bridge and silo tenants' rows land in their own schema, database or file."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import func, select, text, update

from shared.db import Database, bridge_schema, silo_database, upgrade
from shared.db import router as router_module
from shared.db.router import tenant_slug
from shared.tenancy import tenant_scope

from .conftest import MIGRATIONS, as_tenant
from .notes import Note, Setting


async def _write_and_read(db: Database, tenant: str, tier: str, body: str) -> list[tuple[str, str]]:
    with tenant_scope(as_tenant(tenant, tier)):
        async with db.session() as s:
            s.add(Note(body=body))
        async with db.session() as s:
            return [(n.body, n.tenant_id) for n in (await s.scalars(select(Note))).all()]


async def _pooled_bodies(dsn: str, tenant: str, table: str = "public.notes") -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.tenant_id', $1, true)", tenant)
            return [r["body"] for r in await conn.fetch(f"SELECT body FROM {table}")]
    finally:
        await conn.close()


def test_tenant_names_are_safe_and_distinct() -> None:
    """Ids become safe SQL names; ids that had to be altered keep a hash, so they cannot collide."""
    assert tenant_slug("t_abc123") == "t_abc123"
    assert tenant_slug("T_ABC") != tenant_slug("t_abc")
    assert tenant_slug("t-x") != tenant_slug("t_x")
    assert bridge_schema("t_abc") == "tenant_t_abc"
    assert len(silo_database("x" * 40, "t_" + "y" * 60)) <= 63


async def test_sqlite_bridge_and_silo_tenants_get_their_own_files(sqlite_db: Database, tmp_path: Path) -> None:
    """On SQLite, a bridge or silo tenant's rows go to a migrated file of its own, never the main one."""
    assert await _write_and_read(sqlite_db, "t_pool", "pooled", "p") == [("p", "t_pool")]
    assert await _write_and_read(sqlite_db, "t_bridge", "bridge", "b") == [("b", "t_bridge")]
    assert await _write_and_read(sqlite_db, "t_silo", "silo", "s") == [("s", "t_silo")]
    async with sqlite_db.engine.connect() as conn:
        main = (await conn.execute(text("SELECT tenant_id FROM notes"))).scalars().all()
    assert main == ["t_pool"]
    files = sorted(p.name for p in (tmp_path / "data" / "notes.tenants").iterdir() if p.suffix == ".db")
    assert files == ["t_bridge.db", "t_silo.db"]


@pytest.mark.postgres
async def test_postgres_bridge_tenant_gets_its_own_schema(pg_db: Database, pg_urls) -> None:
    """A bridge tenant's rows live in tenant_<id>.notes (RLS on), and raw SQL in its session stays there."""
    await _write_and_read(pg_db, "t_pool", "pooled", "p")
    assert await _write_and_read(pg_db, "t_brg", "bridge", "b") == [("b", "t_brg")]
    with tenant_scope(as_tenant("t_brg", "bridge")):
        async with pg_db.session() as s:
            assert (await s.execute(text("SELECT body FROM notes"))).scalars().all() == ["b"]
    assert await _pooled_bodies(pg_urls.app_dsn, "t_brg") == []
    assert await _pooled_bodies(pg_urls.app_dsn, "t_brg", '"tenant_t_brg".notes') == ["b"]
    assert await _pooled_bodies(pg_urls.app_dsn, "t_pool", '"tenant_t_brg".notes') == []
    conn = await asyncpg.connect(pg_urls.owner_dsn)
    try:
        forced = await conn.fetchval(
            "SELECT relforcerowsecurity FROM pg_class WHERE oid = '\"tenant_t_brg\".notes'::regclass"
        )
    finally:
        await conn.close()
    assert forced is True


@pytest.mark.postgres
async def test_postgres_bridge_first_use_is_provisioned_once(pg_db: Database, monkeypatch) -> None:
    """Concurrent first sessions of a new bridge tenant share one migration run and all succeed."""
    calls: list[str | None] = []

    def counting_upgrade(url, migrations, schema=None, **kw):
        calls.append(schema)
        return upgrade(url, migrations, schema, **kw)

    monkeypatch.setattr(router_module, "upgrade", counting_upgrade)
    await asyncio.gather(*(_write_and_read(pg_db, "t_race", "bridge", f"n{i}") for i in range(4)))
    assert len(await _write_and_read(pg_db, "t_race", "bridge", "last")) == 5
    assert calls == ["tenant_t_race"]


@pytest.mark.postgres
async def test_postgres_silo_tenant_gets_its_own_database(postgres, pg_urls) -> None:
    """A silo tenant's database is created by the owner on first use, migrated, and holds its rows."""
    admin = await asyncpg.connect(postgres.admin_dsn)
    try:
        await admin.execute(f'ALTER ROLE "{pg_urls.owner_role}" CREATEDB')
    finally:
        await admin.close()
    db = await Database.open(pg_urls.app_url, owner_url=pg_urls.owner_url, migrations=MIGRATIONS)
    try:
        await _write_and_read(db, "t_pool", "pooled", "p")
        assert await _write_and_read(db, "t_silo", "silo", "s") == [("s", "t_silo")]
        route = await _route_of(db, "t_silo")
    finally:
        await db.close()
    silo = silo_database(pg_urls.name, "t_silo")
    assert route.bind.url.database == silo
    assert await _pooled_bodies(pg_urls.app_dsn, "t_silo") == []
    silo_dsn = pg_urls.app_dsn.rsplit("/", 1)[0] + "/" + silo
    assert await _pooled_bodies(silo_dsn, "t_silo") == ["s"]
    assert await _pooled_bodies(silo_dsn, "t_pool") == []
    conn = await asyncpg.connect(postgres.admin_dsn)
    try:
        owner = await conn.fetchval("SELECT datdba::regrole::text FROM pg_database WHERE datname = $1", silo)
        public_connect = await conn.fetchval("SELECT has_database_privilege('public', $1, 'CONNECT')", silo)
        await conn.execute(f'DROP DATABASE IF EXISTS "{silo}" WITH (FORCE)')
    finally:
        await conn.close()
    assert owner == pg_urls.owner_role
    assert public_connect is False


async def _route_of(db: Database, tenant: str):
    with tenant_scope(as_tenant(tenant, "silo")):
        return await db.route()


async def _platform_rows_go_to_the_platform_database(db: Database, tenant: str, tier: str) -> None:
    key = f"k-{tenant}"
    with tenant_scope(as_tenant(tenant, tier)):
        async with db.session() as s:  # a tenant row and a platform row in one tenant session
            s.add(Note(body="n"))
            s.add(Setting(key=key, value="v"))
        async with db.session() as s:
            assert (await s.get(Setting, key)).value == "v"
            await s.execute(update(Setting).where(Setting.key == key).values(value="w"))
            assert [n.body for n in (await s.scalars(select(Note))).all()] == ["n"]
        route = await db.route()
    async with db.system_session() as s:
        assert (await s.get(Setting, key)).value == "w"
    async with route.bind.connect() as conn:  # the tenant's own copy of the platform table stays empty
        assert (await conn.execute(select(func.count()).select_from(Setting.__table__))).scalar_one() == 0


@pytest.mark.parametrize("tier", ["bridge", "silo"])
async def test_sqlite_platform_rows_of_bridge_and_silo_sessions_go_to_the_main_file(
    sqlite_db: Database, tier: str
) -> None:
    """A platform table touched in a bridge or silo tenant's session is the main file's, not the tenant's copy."""
    await _platform_rows_go_to_the_platform_database(sqlite_db, f"t_{tier}", tier)


@pytest.mark.postgres
async def test_postgres_platform_rows_of_a_bridge_session_go_to_the_main_schema(pg_db: Database) -> None:
    """A platform table touched in a bridge tenant's session is public's, not the tenant schema's copy."""
    await _platform_rows_go_to_the_platform_database(pg_db, "t_brg_platform", "bridge")

"""Data residency in the router: each region has a database of its own, and a tenant's rows of
every tier (pooled rows, bridge schema, silo database) are written only to its region's, as the
placement lookup says; platform tables stay in the default region's."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import select

from shared.config import RegionDatabase
from shared.db import Database
from shared.errors import FailedPrecondition, Unavailable
from shared.tenancy import PLATFORM_TENANT, tenant_scope

from .conftest import MIGRATIONS, as_tenant
from .notes import Note, Setting

PLACED = {f"t_{region}_{tier}": region for region in ("us", "eu") for tier in ("pooled", "bridge", "silo")}


class Placements:
    """Identity's answers, and who was asked (a tenant's region is asked once per process)."""

    def __init__(self, placed: dict[str, str]) -> None:
        self.placed = dict(placed)
        self.asked: list[str] = []

    async def region_of(self, tenant_id: str) -> str:
        self.asked.append(tenant_id)
        if tenant_id not in self.placed:
            raise Unavailable("identity is down", reason="TENANT_REGION_UNAVAILABLE")
        return self.placed[tenant_id]


async def _workload(db: Database, round_: int = 0) -> None:
    for tenant, region in PLACED.items():
        tier = tenant.rsplit("_", 1)[1]
        with tenant_scope(as_tenant(tenant, tier)):
            async with db.session() as s:
                if not round_:
                    s.add(Note(body=f"{region}-note"))
                s.add(Setting(key=f"k{round_}-{tenant}", value="platform row written in a tenant's session"))
            async with db.session() as s:
                assert [n.body for n in (await s.scalars(select(Note))).all()] == [f"{region}-note"]
            async with db.raw() as tx:  # the hot path routes by region too
                rows = await tx.fetch("SELECT body FROM notes WHERE tenant_id = $1", tenant)
                assert [r[0] for r in rows] == [f"{region}-note"]


async def test_sqlite_regions_keep_each_tenants_rows_in_its_own(tmp_path: Path) -> None:
    placements = Placements(PLACED)
    db = await Database.open(
        f"sqlite:///{tmp_path}/us/notes.db",
        migrations=MIGRATIONS,
        regions={
            "us": None,
            "eu": RegionDatabase(f"sqlite:///{tmp_path}/eu/notes.db", f"sqlite:///{tmp_path}/eu/notes.db"),
        },
        region_of=placements.region_of,
    )
    try:
        assert db.regions == ("us", "eu")
        stores = db.router.stores
        assert list(stores) == ["us", "eu"] and stores["us"].engine is db.engine
        assert stores["eu"].url.database == f"{tmp_path}/eu/notes.db"
        await _workload(db)
        await _workload(db, 1)  # again: routes and regions come from the caches
        assert sorted(placements.asked) == sorted(PLACED)  # once per tenant
    finally:
        await db.close()
    for region in ("us", "eu"):
        files = sorted(p.relative_to(tmp_path / region).as_posix() for p in (tmp_path / region).rglob("*.db"))
        assert files == ["notes.db", f"notes.tenants/t_{region}_bridge.db", f"notes.tenants/t_{region}_silo.db"]
        notes = {row for p in (tmp_path / region).rglob("*.db") for row in _rows(p, "notes", "tenant_id, body")}
        assert notes == {(t, f"{region}-note") for t, r in PLACED.items() if r == region}
    settings = _rows(tmp_path / "us" / "notes.db", "settings")
    assert len(settings) == 2 * len(PLACED)  # platform tables: the default region's database
    assert _rows(tmp_path / "eu" / "notes.db", "settings") == []


def _rows(path: Path, table: str, columns: str = "*") -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.execute(f"SELECT {columns} FROM {table}"))
    finally:
        conn.close()


@pytest.mark.postgres
async def test_postgres_regions_place_pooled_rows_bridge_schemas_and_silo_databases(postgres) -> None:
    us, eu = postgres.create_database_sync("region_us"), postgres.create_database_sync("region_eu")
    placements = Placements(PLACED)
    db = await Database.open(
        us.app_url,
        owner_url=us.owner_url,
        migrations=MIGRATIONS,
        regions={"us": None, "eu": RegionDatabase(eu.app_url, eu.owner_url)},
        region_of=placements.region_of,
    )
    try:
        await _workload(db)
        with tenant_scope(as_tenant("t_eu_bridge", "bridge")):
            route = await db.route()
        assert route.region == "eu" and route.schema == "tenant_t_eu_bridge"
        assert db.router.store_name("t_eu_silo", "silo", "eu").startswith("eu/database:region_eu")
    finally:
        await db.close()
    seen = await _superuser_notes(postgres.admin_dsn, ("region_us", "region_eu"))
    for tenant, region in PLACED.items():
        assert {database.split("_")[1] for database, t in seen if t == tenant} == {region}, tenant
    assert {(d, t) for d, t in seen if t.endswith("_silo")} == {
        ("region_us_t_us_silo", "t_us_silo"),
        ("region_eu_t_eu_silo", "t_eu_silo"),
    }


async def _superuser_notes(admin_dsn: str, prefixes: tuple[str, ...]) -> set[tuple[str, str]]:
    """(database, tenant) of every note in every schema of every database named with a prefix."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        names = [r[0] for r in await conn.fetch("SELECT datname FROM pg_database") if r[0].startswith(prefixes)]
    finally:
        await conn.close()
    out = set()
    for name in names:
        conn = await asyncpg.connect(admin_dsn.rsplit("/", 1)[0] + f"/{name}")
        try:
            for (schema,) in await conn.fetch(
                "SELECT table_schema FROM information_schema.tables WHERE table_name = 'notes'"
            ):
                out |= {(name, r[0]) for r in await conn.fetch(f'SELECT tenant_id FROM "{schema}".notes')}
        finally:
            await conn.close()
    return out


async def test_unplaced_or_unconfigured_region_fails_closed(tmp_path: Path) -> None:
    """identity down: Unavailable; a region this service has no database for: FailedPrecondition;
    never the default region by guess. The platform tenant needs no lookup."""
    placements = Placements({"t_mars": "mars"})
    db = await Database.open(
        f"sqlite:///{tmp_path}/us.db",
        migrations=MIGRATIONS,
        regions={"us": None, "eu": RegionDatabase(f"sqlite:///{tmp_path}/eu.db", f"sqlite:///{tmp_path}/eu.db")},
        region_of=placements.region_of,
    )
    try:
        with tenant_scope(as_tenant("t_unknown")), pytest.raises(Unavailable):
            async with db.session():
                pass
        with tenant_scope(as_tenant("t_mars")), pytest.raises(FailedPrecondition, match="mars"):
            async with db.session():
                pass
        with tenant_scope(as_tenant(PLATFORM_TENANT)):
            async with db.session() as s:
                s.add(Note(body="platform"))
        assert PLATFORM_TENANT not in placements.asked
    finally:
        await db.close()


async def test_one_region_never_asks(tmp_path: Path) -> None:
    """A single-region deployment routes as before: no lookup is wired, none is needed."""
    db = await Database.open(f"sqlite:///{tmp_path}/one.db", migrations=MIGRATIONS, regions={"local": None})
    try:
        with tenant_scope(as_tenant("t_a", "bridge")):
            async with db.session() as s:
                s.add(Note(body="x"))
            assert (await db.route()).region == ""
    finally:
        await db.close()


def test_several_regions_need_a_lookup(tmp_path: Path) -> None:
    from shared.db.router import TenantRouter

    with pytest.raises(ValueError, match="region lookup"):
        TenantRouter(
            None, url=None, owner_url=None, migrations=None, app_role=None, region="us", others={"eu": object()}
        )

"""After a tier migration a service routes by identity's placement, not the token's tier claim, even after a
restart: with several regions the router's placement lookup answers (region, tier) and the tier wins over the
claim; a SwitchTenant in the process wins over both. Two SQLite regions, the shared/db test models."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from shared.config import RegionDatabase
from shared.db import Database
from shared.tenancy import tenant_scope
from tests.shared.db.conftest import MIGRATIONS, as_tenant
from tests.shared.db.notes import Note


class Placements:
    """identity's (region, tier) answers."""

    def __init__(self, placed: dict[str, tuple[str, str]]) -> None:
        self.placed = placed

    async def region_of(self, tenant_id: str) -> tuple[str, str]:
        return self.placed[tenant_id]


async def _open(tmp_path: Path, placements: Placements) -> Database:
    return await Database.open(
        f"sqlite:///{tmp_path}/us/notes.db",
        migrations=MIGRATIONS,
        regions={
            "us": None,
            "eu": RegionDatabase(f"sqlite:///{tmp_path}/eu/notes.db", f"sqlite:///{tmp_path}/eu/notes.db"),
        },
        region_of=placements.region_of,
    )


async def _write(db: Database, tenant: str, claim: str, body: str) -> None:
    with tenant_scope(as_tenant(tenant, claim)):
        async with db.session() as s:
            s.add(Note(body=body))


def _bodies(path: Path, tenant: str) -> list[str]:
    if not path.exists():
        return []
    with sqlite3.connect(path) as conn:
        return [r[0] for r in conn.execute("SELECT body FROM notes WHERE tenant_id = ? ORDER BY body", (tenant,))]


async def test_identity_placement_routes_over_the_token_claim(tmp_path: Path) -> None:
    moved, other = "t_moved", "t_other"
    placements = Placements({moved: ("eu", "bridge"), other: ("eu", "pooled")})
    db = await _open(tmp_path, placements)
    try:
        await _write(db, moved, "pooled", "a")  # a token from before the move: claim pooled, placed bridge
        await _write(db, other, "pooled", "b")
        db.router.place(moved, "silo")  # SwitchTenant in this process wins over the lookup
        await _write(db, moved, "pooled", "c")  # (on SQLite bridge and silo share the tenant's file)
        db.router.place(other, "bridge")
        await _write(db, other, "pooled", "d")
    finally:
        await db.close()
    eu = tmp_path / "eu"
    assert _bodies(eu / "notes.db", moved) == []
    assert _bodies(eu / "notes.tenants" / f"{moved}.db", moved) == ["a", "c"]
    assert _bodies(eu / "notes.db", other) == ["b"]
    assert _bodies(eu / "notes.tenants" / f"{other}.db", other) == ["d"]
    assert _bodies(tmp_path / "us" / "notes.db", moved) == []

    # A restarted service (a new Database) asks identity again and follows the placement it now gives.
    placements.placed[other] = ("eu", "bridge")
    db = await _open(tmp_path, placements)
    try:
        await _write(db, other, "pooled", "e")
    finally:
        await db.close()
    assert _bodies(eu / "notes.tenants" / f"{other}.db", other) == ["d", "e"]
    assert _bodies(eu / "notes.db", other) == ["b"]

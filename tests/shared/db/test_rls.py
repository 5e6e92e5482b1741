"""Layer 2: Postgres row-level security holds for raw SQL as the runtime role, without the ORM."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy import select, text

from shared.db import Database
from shared.tenancy import tenant_scope

from .conftest import MIGRATIONS, as_tenant
from .notes import Note

pytestmark = pytest.mark.postgres

A, B = "t_alpha", "t_bravo"


async def _seed(db: Database) -> None:
    for tenant, bodies in ((A, ["a1", "a2"]), (B, ["b1"])):
        with tenant_scope(as_tenant(tenant)):
            async with db.session() as s:
                s.add_all([Note(body=b) for b in bodies])


async def test_raw_sql_as_app_role_sees_and_writes_only_its_tenant(pg_db: Database, pg_urls) -> None:
    """Inside A's transaction, plain asyncpg as bulkhead_app sees none of B's rows and cannot insert B's."""
    await _seed(pg_db)
    conn = await asyncpg.connect(pg_urls.app_dsn)
    try:
        assert await conn.fetchval("SELECT current_user") == "bulkhead_app"
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.tenant_id', $1, true)", A)
            assert await conn.fetchval("SELECT count(*) FROM notes WHERE tenant_id = $1", B) == 0
            assert sorted(await conn.fetchval("SELECT array_agg(body) FROM notes")) == ["a1", "a2"]
            assert await conn.execute("UPDATE notes SET body = 'x' WHERE tenant_id = $1", B) == "UPDATE 0"
            assert await conn.execute("DELETE FROM notes WHERE tenant_id = $1", B) == "DELETE 0"
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            async with conn.transaction():
                await conn.execute("SELECT set_config('app.tenant_id', $1, true)", A)
                await conn.execute("INSERT INTO notes (body, tenant_id) VALUES ('evil', $1)", B)
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            async with conn.transaction():
                await conn.execute("SELECT set_config('app.tenant_id', $1, true)", A)
                await conn.execute("UPDATE notes SET tenant_id = $1", B)
        # No tenant set at all: nothing is visible.
        assert await conn.fetchval("SELECT count(*) FROM notes") == 0
    finally:
        await conn.close()
    with tenant_scope(as_tenant(B)):
        async with pg_db.session() as s:
            assert (await s.scalars(select(Note.body))).all() == ["b1"]


async def test_raw_sql_through_a_tenant_session_is_still_confined(pg_db: Database) -> None:
    """text() skips the ORM filter, but RLS still limits it to the session's tenant."""
    await _seed(pg_db)
    with tenant_scope(as_tenant(B)):
        async with pg_db.session() as s:
            assert (await s.execute(text("SELECT body FROM notes"))).scalars().all() == ["b1"]
            with pytest.raises(Exception, match="row-level security"):
                await s.execute(text("INSERT INTO notes (body, tenant_id) VALUES ('evil', :t)"), {"t": A})


async def test_app_role_owns_nothing_and_cannot_bypass_rls(pg_db: Database, pg_urls) -> None:
    """The catalogs say: RLS enabled and forced, policy present, runtime role not owner, no BYPASSRLS."""
    conn = await asyncpg.connect(pg_urls.app_dsn)
    try:
        table = await conn.fetchrow(
            "SELECT relowner::regrole::text AS owner, relrowsecurity, relforcerowsecurity "
            "FROM pg_class WHERE oid = 'public.notes'::regclass"
        )
        role = await conn.fetchrow("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user")
        owned = await conn.fetchval(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relowner = (SELECT oid FROM pg_roles WHERE rolname = current_user) "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
        )
        policy = await conn.fetchval(
            "SELECT qual FROM pg_policies WHERE tablename = 'notes' AND policyname = 'tenant_isolation'"
        )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("ALTER TABLE notes DISABLE ROW LEVEL SECURITY")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("UPDATE alembic_version_db SET version_num = 'x'")
    finally:
        await conn.close()
    assert table["owner"] == pg_urls.owner_role != "bulkhead_app"
    assert table["relrowsecurity"] and table["relforcerowsecurity"]
    assert not role["rolsuper"] and not role["rolbypassrls"]
    assert owned == 0
    assert "current_setting('app.tenant_id'" in policy


async def test_tenant_setting_does_not_outlive_its_transaction(pg_urls) -> None:
    """One pooled connection serves A then B: each sees its own tenant, and none is left behind."""
    db = await Database.open(
        pg_urls.app_url, owner_url=pg_urls.owner_url, migrations=MIGRATIONS, pool_size=1, max_overflow=0
    )
    probe = text("SELECT pg_backend_pid(), current_setting('app.tenant_id', true)")
    try:
        seen = []
        for tenant in (A, B):
            with tenant_scope(as_tenant(tenant)):
                async with db.session() as s:
                    s.add(Note(body=tenant))
                    seen.append(tuple((await s.execute(probe)).one()))
        async with db.engine.connect() as conn:
            after = tuple((await conn.execute(probe)).one())
            leftover = await conn.scalar(text("SELECT count(*) FROM notes"))
    finally:
        await db.close()
    (pid_a, tid_a), (pid_b, tid_b) = seen
    assert pid_a == pid_b == after[0]  # really the same pooled connection
    assert (tid_a, tid_b) == (A, B)
    assert after[1] in ("", None)
    assert leftover == 0

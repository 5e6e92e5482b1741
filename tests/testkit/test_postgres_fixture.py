"""The throwaway PostgreSQL fixture gives real roles: the runtime role cannot get around RLS."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from testkit.postgres import APP_ROLE, PostgresServer


async def _owner_creates_rls_table(dsn: str) -> None:
    """What a migration does: a tenant table with ENABLE + FORCE row level security."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("""
            CREATE TABLE notes (id serial PRIMARY KEY, tenant_id text NOT NULL, body text);
            ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
            ALTER TABLE notes FORCE ROW LEVEL SECURITY;
            CREATE POLICY tenant_isolation ON notes
              USING (tenant_id = current_setting('app.tenant_id', true))
              WITH CHECK (tenant_id = current_setting('app.tenant_id', true));
            GRANT SELECT, INSERT, UPDATE, DELETE ON notes TO bulkhead_app;
            GRANT USAGE, SELECT ON SEQUENCE notes_id_seq TO bulkhead_app;
            CREATE TABLE ungranted (id int);
        """)
    finally:
        await conn.close()


async def test_app_role_is_neither_superuser_nor_rls_bypassing(postgres: PostgresServer) -> None:
    """bulkhead_app logs in without superuser, BYPASSRLS, CREATEDB or CREATEROLE."""
    urls = await postgres.create_database("harness_roles")
    conn = await asyncpg.connect(urls.app_dsn)
    try:
        row = await conn.fetchrow(
            "SELECT current_user AS who, rolsuper, rolbypassrls, rolcreatedb, rolcreaterole "
            "FROM pg_roles WHERE rolname = current_user"
        )
    finally:
        await conn.close()
    assert row["who"] == APP_ROLE
    assert (row["rolsuper"], row["rolbypassrls"], row["rolcreatedb"], row["rolcreaterole"]) == (
        False,
        False,
        False,
        False,
    )


async def test_owner_role_is_not_superuser_and_owns_the_database(postgres: PostgresServer) -> None:
    """Each database has its own non-superuser owner, which is what migrations run as."""
    urls = await postgres.create_database("harness_owner")
    conn = await asyncpg.connect(urls.owner_dsn)
    try:
        row = await conn.fetchrow(
            "SELECT r.rolsuper, r.rolbypassrls, pg_get_userbyid(d.datdba) AS dba "
            "FROM pg_roles r, pg_database d "
            "WHERE r.rolname = current_user AND d.datname = current_database()"
        )
    finally:
        await conn.close()
    assert (row["rolsuper"], row["rolbypassrls"]) == (False, False)
    assert row["dba"] == urls.owner_role


async def test_app_role_sees_only_its_tenant_under_forced_rls(postgres: PostgresServer) -> None:
    """Raw SQL as the app role sees only the tenant set in its transaction and can't write B's rows."""
    urls = await postgres.create_database("harness_rls")
    await _owner_creates_rls_table(urls.owner_dsn)
    conn = await asyncpg.connect(urls.app_dsn)
    try:
        for tenant in ("t_a", "t_b"):
            async with conn.transaction():
                await conn.execute("SELECT set_config('app.tenant_id', $1, true)", tenant)
                await conn.execute("INSERT INTO notes (tenant_id, body) VALUES ($1, 'x')", tenant)
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.tenant_id', 't_a', true)")
            seen = await conn.fetch("SELECT tenant_id FROM notes")
            assert [r["tenant_id"] for r in seen] == ["t_a"]
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with conn.transaction():  # savepoint: keep the outer transaction usable
                    await conn.execute("INSERT INTO notes (tenant_id, body) VALUES ('t_b', 'y')")
            updated = await conn.execute("UPDATE notes SET body = 'z' WHERE tenant_id = 't_b'")
            assert updated == "UPDATE 0"
        # Without a tenant in the transaction nothing is visible (fail closed).
        assert await conn.fetchval("SELECT count(*) FROM notes") == 0
    finally:
        await conn.close()
    owner = await asyncpg.connect(urls.owner_dsn)
    try:  # FORCE applies to the owner too: it also needs a tenant to see rows.
        assert await owner.fetchval("SELECT count(*) FROM notes") == 0
    finally:
        await owner.close()


async def test_app_role_cannot_alter_or_disable_rls(postgres: PostgresServer) -> None:
    """The app role owns nothing: no turning RLS off, no DDL, no tables it wasn't granted."""
    urls = await postgres.create_database("harness_noalter")
    await _owner_creates_rls_table(urls.owner_dsn)
    conn = await asyncpg.connect(urls.app_dsn)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("ALTER TABLE notes DISABLE ROW LEVEL SECURITY")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DROP POLICY tenant_isolation ON notes")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CREATE TABLE sneaky (id int)")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):  # no grant, no access
            await conn.fetch("SELECT * FROM ungranted")
    finally:
        await conn.close()


async def test_one_databases_owner_cannot_connect_to_another(postgres: PostgresServer) -> None:
    """PUBLIC's CONNECT is revoked, so one service's owner role can't open another's database."""
    mine = await postgres.create_database("harness_mine")
    theirs = await postgres.create_database("harness_theirs")
    intruder_dsn = mine.owner_dsn.rsplit("/", 1)[0] + "/" + theirs.name
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await asyncpg.connect(intruder_dsn)
    conn = await asyncpg.connect(theirs.app_dsn)  # the runtime role was granted CONNECT
    await conn.close()


async def test_same_name_twice_gives_two_databases(postgres: PostgresServer) -> None:
    """Suites asking for the same name never share a database by accident."""
    first = await postgres.create_database("harness_dup")
    second = await postgres.create_database("harness_dup")
    assert first.name == "harness_dup"
    assert second.name != first.name
    conn = await asyncpg.connect(first.owner_dsn)
    await conn.execute("CREATE TABLE only_in_first (id int)")
    await conn.close()
    conn = await asyncpg.connect(second.owner_dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass('only_in_first')") is None
    finally:
        await conn.close()


def test_bad_database_name_is_refused(postgres: PostgresServer) -> None:
    """Names are SQL identifiers we splice into DDL, so anything else is refused up front."""
    with pytest.raises(ValueError):
        postgres.create_database_sync('x"; DROP DATABASE postgres; --')


def test_sync_variant_and_sqlalchemy_urls_work(postgres: PostgresServer) -> None:
    """create_database_sync works from sync code and its app_url is a usable asyncpg URL."""
    urls = postgres.create_database_sync("harness_sync")
    assert urls.app_url.startswith("postgresql+asyncpg://")
    assert postgres.admin_url.startswith("postgresql+asyncpg://")

    async def whoami() -> str:
        engine = create_async_engine(urls.app_url)
        try:
            async with engine.connect() as conn:
                return (await conn.execute(text("SELECT current_user"))).scalar_one()
        finally:
            await engine.dispose()

    from testkit.postgres import _run_in_thread

    assert _run_in_thread(whoami()) == APP_ROLE


def test_passwords_stay_out_of_repr(postgres: PostgresServer) -> None:
    """The server's repr (shown in pytest failure output) carries no password."""
    assert postgres.admin_password not in repr(postgres)
    assert postgres.app_password not in repr(postgres)


async def test_owner_can_create_silo_databases_and_drop_cleans_them_up(postgres: PostgresServer) -> None:
    """The owner role may CREATEDB (silo tenants); drop_database removes those and the owner."""
    urls = await postgres.create_database("harness_silo")
    owner = await asyncpg.connect(urls.owner_dsn)
    try:
        await owner.execute('CREATE DATABASE "harness_silo_t_a"')
    finally:
        await owner.close()
    await postgres.drop_database(urls.name)
    admin = await asyncpg.connect(postgres.admin_dsn)
    try:
        left = await admin.fetch("SELECT datname FROM pg_database WHERE datname LIKE 'harness_silo%'")
        role = await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", urls.owner_role)
    finally:
        await admin.close()
    assert (left, role) == ([], None)

"""Through PgBouncer in transaction pooling: a server connection never carries one tenant's
`app.tenant_id` (or bridge search_path) into another's transaction, and the engine leaves no
prepared statement behind on a server connection."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest
from sqlalchemy import select, text

from shared.db import Database
from shared.tenancy import tenant_scope

from .conftest import MIGRATIONS, as_tenant
from .notes import Note

pytestmark = pytest.mark.postgres

A, B = "t_alpha", "t_bravo"
_PROBE = text(
    "SELECT pg_backend_pid(), current_setting('app.tenant_id', true), current_setting('search_path'), "
    "(SELECT count(*) FROM notes)"
)


@asynccontextmanager
async def _through(pgbouncer, pg_urls, scheme: str = "postgresql+pgbouncer") -> AsyncIterator[Database]:
    """The notes database opened as the runtime role through PgBouncer (migrations go straight to Postgres)."""
    url = scheme + "://" + pgbouncer.app_url(pg_urls.name).split("://", 1)[1]
    db = await Database.open(url, owner_url=pg_urls.owner_url, migrations=MIGRATIONS)
    try:
        yield db
    finally:
        await db.close()


async def _bare(pgbouncer, pg_urls) -> asyncpg.Connection:
    """A plain client of PgBouncer as the runtime role (no cached, named statements)."""
    return await asyncpg.connect(pgbouncer.app_dsn(pg_urls.name), statement_cache_size=0)


async def _empty(pg_urls) -> None:
    conn = await asyncpg.connect(pg_urls.owner_dsn)
    try:
        await conn.execute("TRUNCATE notes RESTART IDENTITY")
    finally:
        await conn.close()


async def test_next_tenant_on_the_same_server_connection_inherits_nothing(pgbouncer, pg_urls) -> None:
    """A's session, then B's session and raw transaction, then a bare transaction, all on one
    server connection: B sees 0 of A's rows and only its own tenant; the bare one sees no tenant."""
    async with _through(pgbouncer, pg_urls) as db_a, _through(pgbouncer, pg_urls) as db_b:
        await _empty(pg_urls)
        with tenant_scope(as_tenant(A)):
            async with db_a.session() as s:
                s.add_all([Note(body="a1"), Note(body="a2")])
            async with db_a.session() as s:
                pid_a, tenant, _, visible = (await s.execute(_PROBE)).one()
        assert (tenant, visible) == (A, 2)

        with tenant_scope(as_tenant(B)):
            async with db_b.session() as s:  # another client of PgBouncer, the same server connection
                pid_b, tenant, _, visible = (await s.execute(_PROBE)).one()
                orm_rows = (await s.scalars(select(Note))).all()
            async with db_b.raw() as tx:
                raw = await tx.fetchrow(
                    "SELECT pg_backend_pid(), current_setting('app.tenant_id', true), "
                    "(SELECT count(*) FROM notes WHERE tenant_id = $1)",
                    A,
                )
        assert pid_b == pid_a, "precondition: PgBouncer handed B the server connection A used"
        assert (tenant, visible, orm_rows) == (B, 0, [])
        assert tuple(raw) == (pid_a, B, 0)

        conn = await _bare(pgbouncer, pg_urls)
        try:
            async with conn.transaction():
                pid, tenant, notes = await conn.fetchrow(
                    "SELECT pg_backend_pid(), current_setting('app.tenant_id', true), (SELECT count(*) FROM notes)"
                )
        finally:
            await conn.close()
        assert pid == pid_a
        assert tenant in ("", None) and notes == 0


async def test_bridge_search_path_does_not_follow_the_server_connection(postgres, pgbouncer, pg_urls) -> None:
    """A bridge tenant's search_path is transaction-local too: the next pooled tenant gets the default."""
    async with _through(pgbouncer, pg_urls) as db:
        await _empty(pg_urls)
        with tenant_scope(as_tenant("t_bridge_pgb", "bridge")):
            async with db.session() as s:
                s.add(Note(body="in my schema"))
            async with db.session() as s:
                pid_bridge, _, path, visible = (await s.execute(_PROBE)).one()
        assert (path, visible) == ("tenant_t_bridge_pgb", 1)
        with tenant_scope(as_tenant(B)):
            async with db.session() as s:
                pid, tenant, path, visible = (await s.execute(_PROBE)).one()
        assert pid == pid_bridge, "precondition: the same server connection"
        assert (tenant, visible) == (B, 0)
        assert "tenant_" not in path


async def test_a_session_level_setting_would_leak_and_the_probe_sees_it(pgbouncer, pg_urls) -> None:
    """Control: PgBouncer runs no reset between transactions, so set_config(..., false) does carry
    A to the next client. The tests above would catch a DB layer that set the tenant that way."""
    first, second = await _bare(pgbouncer, pg_urls), await _bare(pgbouncer, pg_urls)
    try:
        async with first.transaction():
            pid = await first.fetchval("SELECT pg_backend_pid()")
            await first.execute(f"SELECT set_config('app.tenant_id', '{A}', false)")
        try:
            async with second.transaction():
                leaked = await second.fetchrow("SELECT pg_backend_pid(), current_setting('app.tenant_id', true)")
        finally:
            async with second.transaction():
                await second.execute("SELECT set_config('app.tenant_id', '', false)")
    finally:
        await first.close()
        await second.close()
    assert tuple(leaked) == (pid, A)


async def test_engine_leaves_no_prepared_statement_on_server_connections(pgbouncer, pg_urls) -> None:
    """Concurrent ORM and raw work through PgBouncer succeeds and leaves pg_prepared_statements empty;
    the plain asyncpg dialect (control) leaves its named statements behind."""

    async def work(db: Database, n: int) -> None:
        with tenant_scope(as_tenant(f"t_load_{n % 3}")):
            async with db.session() as s:
                s.add(Note(body=f"n{n}"))
            async with db.session() as s:
                await s.scalars(select(Note).where(Note.body == f"n{n}"))
            async with db.raw() as tx:
                await tx.fetch("SELECT id FROM notes WHERE tenant_id = $1 AND body = $2", f"t_load_{n % 3}", f"n{n}")

    async def leftovers() -> int:
        conns = [await _bare(pgbouncer, pg_urls) for _ in range(4)]
        try:  # hold 4 transactions open at once: every server connection of the pool is inspected
            txs = [c.transaction() for c in conns]
            for tx in txs:
                await tx.start()
            counts = [await c.fetchval("SELECT count(*) FROM pg_prepared_statements") for c in conns]
            for c, tx in zip(conns, txs, strict=True):
                await c.execute("DEALLOCATE ALL")  # not transactional: leaves the pool clean
                await tx.rollback()
            return sum(counts)
        finally:
            for c in conns:
                await c.close()

    async with _through(pgbouncer, pg_urls) as db:
        await _empty(pg_urls)
        await asyncio.gather(*(work(db, n) for n in range(24)))
    assert await leftovers() == 0

    async with _through(pgbouncer, pg_urls, scheme="postgresql+asyncpg") as db:
        await work(db, 99)
    assert await leftovers() > 0


async def _write_and_count(db: Database, tenant: str, tier: str) -> int:
    with tenant_scope(as_tenant(tenant, tier)):
        async with db.session() as s:
            s.add(Note(body="x"))
        async with db.session() as s:
            return len((await s.scalars(select(Note))).all())


async def test_migrations_and_silo_provisioning_run_through_pgbouncer(postgres, pgbouncer) -> None:
    """A single-role deployment whose only URL is PgBouncer's: migrations (one transaction, Alembic's own
    engine) and a silo tenant's CREATE DATABASE (autocommit) work through the pooler."""
    urls = await postgres.create_database("pgb_single_role")
    password = urllib.parse.unquote(urllib.parse.urlsplit(urls.owner_dsn).password or "")
    await pgbouncer.add_user(urls.owner_role, password, urls.name)
    url = "postgresql+pgbouncer://" + pgbouncer.dsn(urls.owner_role, password, urls.name).split("://", 1)[1]
    db = await Database.open(url, migrations=MIGRATIONS)
    try:
        assert await _write_and_count(db, "t_single", "pooled") == 1
        assert await _write_and_count(db, "t_single_silo", "silo") == 1
        with tenant_scope(as_tenant("t_single_silo", "silo")):
            assert (await db.route()).bind.url.drivername == "postgresql+pgbouncer"
    finally:
        await db.close()
        await postgres.drop_database(urls.name)

"""Raw transactions (shared.db.raw): one SQL text on both dialects, atomic, and on Postgres still
confined by row-level security to the context's tenant even when a statement forgets its filter."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from sqlalchemy import event, select

from shared.db import Database
from shared.db.raw import autocommit_fetch, sqlite_sql
from shared.tenancy import NoTenantContext, tenant_scope
from testkit.pool import until_kept_connections_went_back

from .conftest import as_tenant
from .notes import Note

A, B = "t_alpha", "t_bravo"


async def _bodies(db: Database, tenant: str) -> list[str]:
    with tenant_scope(as_tenant(tenant)):
        async with db.session() as s:
            return sorted((await s.execute(select(Note.body))).scalars())


def test_placeholders_become_sqlite_numbered_parameters() -> None:
    assert sqlite_sql("SELECT $1, $2, $10 WHERE a = $1") == "SELECT ?1, ?2, ?10 WHERE a = ?1"


async def test_raw_reads_and_writes_commit_on_both_dialects(db: Database) -> None:
    with tenant_scope(as_tenant(A)):
        async with db.raw(write=True) as tx:
            await tx.executemany("INSERT INTO notes (tenant_id, body) VALUES ($1, $2)", [(A, "a1"), (A, "a2")])
            assert await tx.execute("UPDATE notes SET body = $2 WHERE tenant_id = $1 AND body = $3", A, "a3", "a2") == 1
        async with db.raw() as tx:
            assert await tx.fetchval("SELECT count(*) FROM notes WHERE tenant_id = $1", A) == 2
            assert await tx.fetchrow("SELECT body FROM notes WHERE tenant_id = $1 AND body = $2", A, "none") is None
            rows = await tx.fetch("SELECT body FROM notes WHERE tenant_id = $1 ORDER BY body", A)
    assert [r[0] for r in rows] == ["a1", "a3"]
    assert await _bodies(db, A) == ["a1", "a3"]


async def test_an_error_rolls_the_whole_transaction_back(db: Database) -> None:
    with tenant_scope(as_tenant(A)), pytest.raises(RuntimeError):
        async with db.raw(write=True) as tx:
            await tx.execute("INSERT INTO notes (tenant_id, body) VALUES ($1, $2)", A, "half")
            raise RuntimeError("fail after the first statement")
    assert await _bodies(db, A) == []
    with tenant_scope(as_tenant(A)):  # the pooled connection came back clean and usable
        async with db.raw(write=True) as tx:
            await tx.execute("INSERT INTO notes (tenant_id, body) VALUES ($1, $2)", A, "whole")
    assert await _bodies(db, A) == ["whole"]


async def test_a_connection_whose_transaction_ended_goes_back_without_the_pools_reset_rollback(db: Database) -> None:
    resets = []
    pool = db.engine.sync_engine.pool
    record = lambda _dbapi, _record, state: resets.append(state.transaction_was_reset)  # noqa: E731
    event.listen(pool, "reset", record)
    try:
        with tenant_scope(as_tenant(A)):
            async with db.raw(write=True) as tx:
                await tx.execute("INSERT INTO notes (tenant_id, body) VALUES ($1, $2)", A, "kept")
            with pytest.raises(RuntimeError):
                async with db.raw(write=True) as tx:
                    await tx.execute("INSERT INTO notes (tenant_id, body) VALUES ($1, $2)", A, "dropped")
                    raise RuntimeError("rolled back here, not by the pool")
        await until_kept_connections_went_back(pool)
    finally:
        event.remove(pool, "reset", record)
    # Committed, then rolled back on the connection kept between the two (shared.db.kept), which went back
    # once idle: no hand-back needed the pool's rollback.
    assert resets and all(resets)
    assert await _bodies(db, A) == ["kept"]  # and the reused connection carried nothing over


async def test_raw_needs_a_tenant(db: Database) -> None:
    with pytest.raises(NoTenantContext):
        async with db.raw():
            pass


@pytest.mark.postgres
async def test_postgres_rls_confines_raw_sql_that_forgets_its_filter(pg_db: Database) -> None:
    for tenant, body in ((A, "a1"), (B, "b1")):
        with tenant_scope(as_tenant(tenant)):
            async with pg_db.raw() as tx:
                await tx.execute("INSERT INTO notes (tenant_id, body) VALUES ($1, $2)", tenant, body)
    with tenant_scope(as_tenant(A)):
        async with pg_db.raw() as tx:
            assert [r[0] for r in await tx.fetch("SELECT body FROM notes")] == ["a1"]  # no WHERE: RLS still holds
            assert await tx.execute("DELETE FROM notes WHERE tenant_id = $1", B) == 0
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            async with pg_db.raw() as tx:
                await tx.execute("INSERT INTO notes (tenant_id, body) VALUES ($1, $2)", B, "evil")
    assert await _bodies(pg_db, B) == ["b1"]


@pytest.mark.postgres
async def test_postgres_bridge_tenant_raw_sql_lands_in_its_schema(pg_db: Database, pg_urls) -> None:
    with tenant_scope(as_tenant("t_bridge_raw", tier="bridge")):
        async with pg_db.raw() as tx:
            await tx.execute("INSERT INTO notes (tenant_id, body) VALUES ($1, $2)", "t_bridge_raw", "mine")
    conn = await asyncpg.connect(pg_urls.app_dsn)
    try:
        async with conn.transaction():  # RLS is forced, so read as the tenant
            await conn.execute("SELECT set_config('app.tenant_id', 't_bridge_raw', true)")
            assert await conn.fetchval("SELECT count(*) FROM tenant_t_bridge_raw.notes") == 1
            assert await conn.fetchval("SELECT count(*) FROM public.notes") == 0
    finally:
        await conn.close()


@pytest.mark.postgres
async def test_a_connection_lost_mid_transaction_is_unavailable_not_internal(pg_db: Database, postgres) -> None:
    """A server that drops the connection (a failover, a restart) surfaces as UNAVAILABLE with a retry
    hint, so callers retry idempotent work, and the pool carries on with a fresh connection."""
    from shared.errors import Unavailable

    with tenant_scope(as_tenant(A)):
        with pytest.raises(Unavailable) as lost:
            async with pg_db.raw() as tx:
                pid = await tx.fetchval("SELECT pg_backend_pid()")
                admin = await asyncpg.connect(postgres.admin_dsn)
                try:
                    await admin.execute("SELECT pg_terminate_backend($1)", pid)
                finally:
                    await admin.close()
                await tx.execute("INSERT INTO notes (tenant_id, body) VALUES ($1, $2)", A, "lost")
        assert lost.value.reason == "DATABASE_UNAVAILABLE" and lost.value.retry_after
        async with pg_db.raw() as tx:
            assert await tx.fetchval("SELECT count(*) FROM notes") == 0


@pytest.mark.postgres
async def test_a_transaction_that_fails_as_it_begins_leaves_no_open_transaction_in_the_pool(
    pg_db: Database, monkeypatch
) -> None:
    """A statement after BEGIN fails (e.g. a late cancel request meant for the connection's previous statement
    cancels the tenant setting): the connection is inside a failed transaction its pool adapter did not start,
    so the pool's reset would not end it; it must be thrown away, or the next session to check it out fails
    ("a manually started transaction")."""
    with tenant_scope(as_tenant(A)):  # connected once already (the dialect's first-connect queries done)
        async with pg_db.raw() as tx:
            await tx.fetchval("SELECT 1")
    execute = asyncpg.Connection.execute

    async def begin_then_fail(self, query, *args, **kwargs):
        if query.startswith("BEGIN;"):
            query = "BEGIN; SELECT 1/0"
        return await execute(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "execute", begin_then_fail)
    with tenant_scope(as_tenant(A)), pytest.raises(asyncpg.DivisionByZeroError):
        async with pg_db.raw():
            pass
    monkeypatch.setattr(asyncpg.Connection, "execute", execute)
    async with pg_db.engine.connect() as conn:  # whichever connection the pool hands out is usable
        assert (await conn.execute(select(1))).scalar_one() == 1


@pytest.mark.postgres
async def test_a_pooled_connection_whose_server_went_away_is_unavailable_at_begin(pg_db: Database, postgres) -> None:
    """The pool hands out a connection whose backend was terminated while it sat idle (the database
    restarted): the transaction's first statement fails, and that is UNAVAILABLE, not INTERNAL; the
    dead connection is not handed out again."""
    from shared.errors import Unavailable

    with tenant_scope(as_tenant(A)):
        async with pg_db.raw() as tx:
            pid = await tx.fetchval("SELECT pg_backend_pid()")
        admin = await asyncpg.connect(postgres.admin_dsn)
        try:
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        await asyncio.sleep(0.2)
        with pytest.raises(Unavailable) as lost:
            async with pg_db.raw() as tx:
                await tx.execute("INSERT INTO notes (tenant_id, body) VALUES ($1, $2)", A, "never")
        assert lost.value.reason == "DATABASE_UNAVAILABLE"
        async with pg_db.raw() as tx:
            assert await tx.fetchval("SELECT count(*) FROM notes") == 0


async def test_a_connect_cancelled_while_the_server_is_silent_stays_cancelled() -> None:
    """A task cancelled during its engine's first connect (a stop, a deadline) ends cancelled: the
    "lost connection" translation must not turn the cancellation into UNAVAILABLE, or the loop that
    was cancelled carries on and its stop() never returns."""
    from shared.db.engine import make_engine

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, never answers asyncpg's startup message

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    engine = make_engine(f"postgresql://nobody@127.0.0.1:{port}/nothing", connect_args={"timeout": 30})
    try:

        async def connect() -> None:
            async with engine.connect():
                pass

        task = asyncio.create_task(connect())
        await asyncio.sleep(0.3)  # inside asyncpg's connect, waiting for the server
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
    finally:
        await engine.dispose()
        server.close()


@pytest.mark.postgres
async def test_autocommit_fetch_is_one_implicit_transaction_confined_by_the_statement(pg_db: Database) -> None:
    """A statement that sets its tenant itself commits on its own; the connection keeps no tenant after it; a
    refused statement did nothing and leaves its connection usable; SQLite is refused outright."""
    insert = (
        "WITH t AS (SELECT set_config('app.tenant_id', $1, true)) "
        "INSERT INTO notes (tenant_id, body) SELECT $1, $2 FROM t RETURNING body"
    )
    assert [r[0] for r in await autocommit_fetch(pg_db.engine, insert, A, "a1")] == ["a1"]
    assert await _bodies(pg_db, A) == ["a1"]
    # No tenant left behind: the next statement on a pooled connection sees no tenant's rows.
    assert await autocommit_fetch(pg_db.engine, "SELECT body FROM notes") == []
    with pytest.raises(asyncpg.InsufficientPrivilegeError):  # another tenant's row under A's setting: refused
        await autocommit_fetch(
            pg_db.engine,
            "WITH t AS (SELECT set_config('app.tenant_id', $1, true)) "
            "INSERT INTO notes (tenant_id, body) SELECT $2, 'evil' FROM t",
            A,
            B,
        )
    assert await _bodies(pg_db, B) == []
    assert [r[0] for r in await autocommit_fetch(pg_db.engine, insert, A, "a2")] == ["a2"]


async def test_autocommit_fetch_is_for_postgres_only(db: Database) -> None:
    if db.dialect != "sqlite":
        pytest.skip("the SQLite variant")
    with pytest.raises(ValueError, match="Postgres"):
        await autocommit_fetch(db.engine, "SELECT 1")

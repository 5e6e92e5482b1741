"""Connections the raw paths keep between calls (shared.db.kept): reused while busy, back in the pool once
quiet, never more than half the pool, closed with the engine, and never carrying one call's state into
the next."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from sqlalchemy import event, make_url

from shared.db import Database
from shared.db.raw import autocommit_fetch
from shared.tenancy import tenant_scope
from testkit.pool import until_kept_connections_went_back

from .conftest import as_tenant, open_emptied

A, B = "t_alpha", "t_bravo"


async def test_back_to_back_transactions_reuse_one_connection_without_the_pool(db: Database) -> None:
    pool = db.engine.sync_engine.pool
    checkouts = []
    count = lambda *_: checkouts.append(1)  # noqa: E731
    event.listen(pool, "checkout", count)
    try:
        with tenant_scope(as_tenant(A)):
            for i in range(5):
                async with db.raw(write=True) as tx:
                    await tx.execute("INSERT INTO notes (tenant_id, body) VALUES ($1, $2)", A, f"n{i}")
                assert pool.checkedout() == 1  # kept for the next call, not handed back
    finally:
        event.remove(pool, "checkout", count)
    assert len(checkouts) == 1
    await until_kept_connections_went_back(pool)  # and handed back once nothing used it for HOLD_S


async def test_a_connection_left_mid_transaction_is_not_kept(db: Database) -> None:
    """A transaction that failed and whose rollback failed too leaves its connection invalidated, never kept."""
    pool = db.engine.sync_engine.pool
    with tenant_scope(as_tenant(A)), pytest.raises(RuntimeError):
        async with db.raw(write=True) as tx:
            await tx.execute("INSERT INTO notes (tenant_id, body) VALUES ($1, $2)", A, "x")
            driver = tx._driver
            # Break the connection's rollback: the connection must then be thrown away, not kept.
            if db.engine.dialect.name == "postgresql":
                driver.terminate()
            else:
                await driver.close()
            raise RuntimeError("fail after the first statement")
    assert pool.checkedout() == 0


async def test_at_most_half_the_pool_is_kept(tmp_path) -> None:
    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'k.db'}", pool_size=4, max_overflow=0)
    try:
        gate = asyncio.Event()

        async def hold() -> None:
            with tenant_scope(as_tenant(A)):
                async with db.raw() as tx:
                    await tx.fetchval("SELECT 1")
                    await gate.wait()

        tasks = [asyncio.create_task(hold()) for _ in range(4)]
        while db.engine.sync_engine.pool.checkedout() < 4:
            await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(*tasks)
        assert db.engine.sync_engine.pool.checkedout() == 2  # kept: half of 4; the others went back
    finally:
        await db.close()


@pytest.mark.postgres
async def test_a_kept_connection_carries_no_tenant_into_the_next_call(pg_db: Database) -> None:
    """The tenant setting is transaction-local: the kept connection serves B's call with nothing of A's."""
    with tenant_scope(as_tenant(A)):
        async with pg_db.raw(write=True) as tx:
            await tx.execute("INSERT INTO notes (tenant_id, body) VALUES ($1, $2)", A, "a's")
            pid = await tx.fetchval("SELECT pg_backend_pid()")
    with tenant_scope(as_tenant(B)):
        async with pg_db.raw() as tx:
            assert await tx.fetchval("SELECT pg_backend_pid()") == pid  # the same, kept connection
            assert await tx.fetchval("SELECT count(*) FROM notes") == 0  # RLS: B sees none of A's rows
            assert await tx.fetchval("SELECT current_setting('app.tenant_id', true)") == B
    rows = await autocommit_fetch(pg_db.engine, "SELECT pg_backend_pid(), current_setting('app.tenant_id', true)")
    assert rows[0][0] == pid and rows[0][1] in (None, "")  # outside a transaction: no tenant left over


@pytest.mark.postgres
async def test_disposing_of_the_engine_closes_kept_connections(postgres) -> None:
    """A silo tenant's erasure drops its database right after disposing of its engine: a kept connection
    would still hold the database open and make DROP DATABASE fail."""
    admin = await asyncpg.connect(postgres.admin_dsn)
    try:
        await admin.execute("DROP DATABASE IF EXISTS kept_drop")
        await admin.execute("CREATE DATABASE kept_drop")
        url = make_url(postgres.admin_url).set(database="kept_drop")
        db = await Database.open(url)
        rows = await autocommit_fetch(db.engine, "SELECT pg_backend_pid()")
        assert db.engine.sync_engine.pool.checkedout() == 1  # kept
        await db.close()
        assert not await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", rows[0][0])
        await admin.execute("DROP DATABASE kept_drop")  # nothing holds it open
    finally:
        await admin.close()


@pytest.mark.postgres
async def test_closing_the_database_closes_a_bridge_routes_kept_connection(pg_urls, postgres) -> None:
    """A bridge tenant's route is a copy of the engine (its schema mapped): what it kept closes with the
    database all the same."""
    db = await open_emptied(pg_urls.app_url, pg_urls)
    with tenant_scope(as_tenant("t_bridge_kept", tier="bridge")):
        async with db.raw() as tx:
            pid = await tx.fetchval("SELECT pg_backend_pid()")
    await db.close()
    admin = await asyncpg.connect(postgres.admin_dsn)
    try:
        assert not await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)
    finally:
        await admin.close()


def test_a_keeper_whose_loop_closed_keeps_for_the_next_loop(tmp_path) -> None:
    """Connections kept on a loop that has since closed are closed, and keeping goes on for the running loop
    (a CLI that runs asyncio.run more than once, a test's loop per test)."""
    db = asyncio.run(Database.open(f"sqlite+aiosqlite:///{tmp_path / 'loops.db'}"))
    pool = db.engine.sync_engine.pool
    checkouts: list[int] = []
    event.listen(pool, "checkout", lambda *_: checkouts.append(1))

    async def two_calls() -> int:
        before = len(checkouts)
        with tenant_scope(as_tenant(A)):
            for _ in range(2):
                async with db.raw() as tx:
                    await tx.fetchval("SELECT 1")
        return len(checkouts) - before

    try:
        assert asyncio.run(two_calls()) == 1  # the second call used the connection the first kept
        assert asyncio.run(two_calls()) == 1  # that loop closed: its connection went, and this loop keeps too
    finally:
        asyncio.run(db.close())

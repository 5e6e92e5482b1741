"""Raw transactions on the driver connection, for hot paths where the ORM's cost per statement
(about 0.2 ms of CPU each, and 0.8 ms for an empty tenant session) is most of the work.

    async with db.raw() as tx:                      # needs a TenantContext
        row = await tx.fetchrow("UPDATE t SET n = n + $2 WHERE tenant_id = $1 RETURNING n", tid, 1)

One SQL text serves both dialects: `$1..$n` placeholders (rewritten to `?1..?n` for SQLite).
Nothing filters these statements for you, so every one names `tenant_id` itself. On Postgres the
transaction still starts with `app.tenant_id` set (and the bridge schema as search_path), so
row-level security confines it as it confines the ORM: a forgotten filter returns nothing,
never another tenant's rows. Keep raw SQL in a service's store module, next to its ORM twin.
"""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util.concurrency import greenlet_spawn

from shared.db.engine import _database_unavailable
from shared.db.kept import keeper

_PLACEHOLDER = re.compile(r"\$(\d+)")
_SAFE_TENANT = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


@functools.lru_cache(maxsize=512)
def sqlite_sql(sql: str) -> str:
    """`$n` placeholders as SQLite's numbered `?n`."""
    return _PLACEHOLDER.sub(r"?\1", sql)


def _literal(value: str) -> str:
    # BEGIN and set_config travel in one simple-protocol round trip, which takes no parameters:
    # the tenant id is checked against a strict pattern and quoted.
    if not _SAFE_TENANT.match(value):
        raise ValueError("tenant id has characters that are not allowed")
    return "'" + value.replace("'", "''") + "'"


class RawTransaction:
    """The statements of one transaction; rows come back as tuples (asyncpg Records on Postgres)."""

    def __init__(self, driver: Any, dialect: str) -> None:
        self._driver, self.dialect = driver, dialect

    async def fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        """All rows of a statement."""
        if self.dialect == "postgresql":
            return await self._driver.fetch(sql, *args)
        # One trip to aiosqlite's thread (execute, fetch and close there), not three.
        return list(await self._driver.execute_fetchall(sqlite_sql(sql), args))

    async def fetchrow(self, sql: str, *args: Any) -> Sequence[Any] | None:
        """The first row of a statement, or None."""
        if self.dialect == "postgresql":
            return await self._driver.fetchrow(sql, *args)
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """The first column of the first row, or None."""
        row = await self.fetchrow(sql, *args)
        return row[0] if row is not None else None

    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; returns the rows it changed."""
        if self.dialect == "postgresql":
            status = await self._driver.execute(sql, *args)
            tail = status.rsplit(" ", 1)[-1]
            return int(tail) if tail.isdigit() else 0
        cursor = await self._driver.execute(sqlite_sql(sql), args)
        try:
            return cursor.rowcount
        finally:
            await cursor.close()

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run a statement once per row of arguments."""
        rows = list(rows)
        if not rows:
            return
        if self.dialect == "postgresql":
            await self._driver.executemany(sql, rows)
        else:
            await self._driver.executemany(sqlite_sql(sql), rows)


@asynccontextmanager
async def raw_transaction(
    engine: AsyncEngine, *, tenant_id: str | None, schema: str | None = None, write: bool = False
) -> AsyncIterator[RawTransaction]:
    """A transaction on a pooled driver connection: committed on exit, rolled back on error.

    tenant_id None is a platform transaction (no RLS tenant: tenant rows stay invisible).
    write=True takes SQLite's write lock up front, so a reader never fails upgrading to a writer.
    """
    dialect = engine.dialect.name
    async with _pooled(engine) as lease:
        fairy = lease.fairy
        driver = fairy.driver_connection
        if driver is None:  # only a connection already handed back to the pool has none
            raise RuntimeError("the pooled connection has no driver connection")
        if dialect == "postgresql":
            begin = "BEGIN"
            if tenant_id is not None:
                begin += f"; SELECT set_config('app.tenant_id', {_literal(tenant_id)}, true)"
            if schema:
                begin += f"; SELECT set_config('search_path', {_literal(schema)}, true)"
        else:
            begin = "BEGIN IMMEDIATE" if write else "BEGIN"
        try:
            await driver.execute(begin)
        except BaseException as exc:
            # The connection must not go back: a statement after BEGIN that failed (a late cancel request meant
            # for an earlier statement) leaves it inside a failed transaction, which the pool's reset does not
            # end (its adapter did not start it), so the next session would find it open. One whose server
            # restarted fails here too: nothing was done, so the caller may retry (UNAVAILABLE).
            await _invalidate(fairy)
            if _connection_lost(exc, usable=False):
                raise _database_unavailable() from exc
            raise
        try:
            yield RawTransaction(driver, dialect)
        except BaseException as exc:
            rolled_back = True
            try:
                await (driver.execute("ROLLBACK") if dialect == "postgresql" else driver.rollback())
                lease.idle = True
            except BaseException:  # noqa: BLE001 - whatever the rollback hit, the connection is thrown away
                rolled_back = False
                await _invalidate(fairy)  # never hand the pool a connection stuck in a transaction
            if _connection_lost(exc, usable=rolled_back):
                raise _database_unavailable() from exc
            raise
        try:
            await (driver.execute("COMMIT") if dialect == "postgresql" else driver.commit())
            lease.idle = True
        except BaseException as exc:
            await _invalidate(fairy)
            if _connection_lost(exc, usable=False):  # the outcome is unknown: only idempotent calls are retried
                raise _database_unavailable() from exc
            raise


class _Lease:
    """A pooled connection on loan. idle: its transaction is known to be over (committed or rolled back
    here), so handing it back skips the pool's reset rollback: on SQLite one more trip to aiosqlite's
    thread per transaction, for nothing."""

    __slots__ = ("fairy", "idle")

    def __init__(self, fairy: Any) -> None:
        self.fairy, self.idle = fairy, False


@asynccontextmanager
async def _pooled(engine: AsyncEngine) -> AsyncIterator[_Lease]:
    """A connection of the engine's pool: one kept idle by an earlier call (shared.db.kept), else one
    checked out; after, kept for the next call when idle, else handed back (unless it was invalidated).

    The pool's connection itself, not an AsyncConnection: no Connection object and one greenlet less
    each way, the better part of the ORM-free path's own cost. Checking out may connect or pre-ping
    and checking in may reset, hence the greenlets; a failed connect is UNAVAILABLE as through
    engine.connect() (shared.db.engine's handle_error), whose other errors pass unchanged.
    """
    kept = keeper(engine.sync_engine)
    fairy: Any = kept.take() if kept is not None else None
    if fairy is None:
        try:
            fairy = await greenlet_spawn(engine.sync_engine.pool.connect)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise _database_unavailable() from exc
    lease = _Lease(fairy)
    try:
        yield lease
    finally:
        if fairy.is_valid and not (lease.idle and kept is not None and kept.give(fairy)):
            # Back to the pool (an invalidated one was closed already). _close_special is how SQLAlchemy's own
            # Connection hands back a connection it already reset; the pool's reset event still fires (with
            # transaction_was_reset set).
            await greenlet_spawn(fairy._close_special, lease.idle)


async def autocommit_fetch(engine: AsyncEngine, sql: str, *args: Any) -> list[Sequence[Any]]:
    """Postgres: one statement in one round trip, outside BEGIN/COMMIT, so the server runs it as its own
    implicit transaction: atomic, committed when it returns, rolled back whole when it fails.

    Nothing sets a tenant here: the statement must confine itself (e.g. a SECURITY INVOKER function
    that sets app.tenant_id transaction-locally as its first step), and the connection keeps nothing
    of it. Errors as raw_transaction's: a refused connect, or a connection lost while the statement
    ran (its outcome then unknown), is UNAVAILABLE; a connection the statement may not have left
    clean is thrown away, never handed back to the pool.
    """
    if engine.dialect.name != "postgresql":
        raise ValueError("autocommit_fetch is for Postgres; SQLite work goes through raw_transaction")
    async with _pooled(engine) as lease:
        fairy = lease.fairy
        driver = fairy.driver_connection
        if driver is None or driver.is_in_transaction():  # never: the pool hands out idle connections
            await _invalidate(fairy)
            raise RuntimeError("the pooled connection is not idle")
        import asyncpg

        try:
            rows = await driver.fetch(sql, *args)
            lease.idle = True  # its implicit transaction ended with the statement
            return rows
        except asyncpg.PostgresError as exc:
            # The server refused the statement (rolled back whole); the connection is idle again
            # unless the server itself went away.
            if _connection_lost(exc, usable=True):
                await _invalidate(fairy)
                raise _database_unavailable() from exc
            raise
        except BaseException as exc:
            # Cancelled or cut off mid-statement: the connection's state is unknown, so it goes.
            await _invalidate(fairy)
            if _connection_lost(exc, usable=False):  # the outcome is unknown: only idempotent calls are retried
                raise _database_unavailable() from exc
            raise


async def _invalidate(fairy: Any) -> None:
    """Close a pooled connection for good (the pool opens a new one in its place)."""
    if fairy.is_valid:
        await greenlet_spawn(fairy.invalidate)


def _connection_lost(exc: BaseException, *, usable: bool) -> bool:
    """Whether the driver lost its server (a failover, a restart), as opposed to a failing statement.

    usable: the connection still answered (a ROLLBACK went through). The ORM's errors pass SQLAlchemy's
    disconnect handling (shared.db.engine); the driver's own, on a raw transaction, do not, and would
    otherwise reach the caller as INTERNAL instead of UNAVAILABLE.
    """
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    try:
        import asyncpg
    except ImportError:  # an embedded (SQLite-only) install
        return False
    if isinstance(exc, (asyncpg.InterfaceError, asyncpg.InternalClientError)):
        # "connection is closed", or the driver's state machine caught mid-way by the server's goodbye:
        # a driver error counts as a lost server only when the connection no longer answers either.
        return not usable
    return isinstance(
        exc,
        (
            asyncpg.PostgresConnectionError,
            asyncpg.AdminShutdownError,
            asyncpg.CrashShutdownError,
            asyncpg.CannotConnectNowError,
        ),
    )

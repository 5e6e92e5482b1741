"""Engine factory: async Postgres (asyncpg) or embedded SQLite (aiosqlite) from one URL.

`postgresql+pgbouncer://` is asyncpg behind a transaction-mode pooler (PgBouncer before 1.21,
which cannot track prepared statements): consecutive transactions of one client may run on
different server connections, so no prepared statement may outlive its transaction.

Failover: a URL may name several servers (`postgresql://u:pw@/db?host=a:5432&host=b:5432&
target_session_attrs=read-write`); asyncpg connects to the first that accepts writes. After the
primary dies every pooled connection is dead, so such engines ping a connection before handing it
out (pool_pre_ping) and a dead one is replaced instead of failing a call. On every Postgres engine,
a lost connection or a failed connect is raised as UNAVAILABLE (retry later), not as an internal
error: the gRPC retry policy then retries idempotent calls by itself.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from sqlalchemy import URL, event, make_url
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

_ASYNC_DRIVERS = {"postgresql": "postgresql+asyncpg", "postgres": "postgresql+asyncpg", "sqlite": "sqlite+aiosqlite"}


def _unnamed_statement() -> str:
    return ""


class PgBouncerDialect(PGDialect_asyncpg):
    """asyncpg for a URL behind a transaction pooler: unnamed, uncached statements only.

    A named statement stays on the server connection it was prepared on; the client's next
    transaction may get another one ("prepared statement does not exist"), or a connection that
    still holds a same-named statement of another process ("already exists"). With asyncpg's
    cache off, an unnamed statement is parsed again in the same round trip as its execution.
    """

    supports_statement_cache = True  # SQL compilation is asyncpg's, unchanged: its cache is safe

    def create_connect_args(self, url: URL) -> Any:
        """asyncpg's connect arguments with both statement caches off and unnamed statements."""
        args, opts = super().create_connect_args(url)
        opts["statement_cache_size"] = 0  # asyncpg's own cache (and raw transactions' fetches)
        opts["prepared_statement_cache_size"] = 0  # SQLAlchemy's cache of prepared statements
        opts["prepared_statement_name_func"] = _unnamed_statement
        return args, opts


# Registered on import, so every engine made from such a URL (migrations, silo databases) gets it.
registry.register("postgresql.pgbouncer", __name__, "PgBouncerDialect")


def normalize_url(url: str | URL) -> URL:
    """The async-driver form of a database URL (`postgresql://` → asyncpg, `sqlite://` → aiosqlite).

    A URL that names its driver (`postgresql+pgbouncer://`) is kept as it is."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend not in ("postgresql", "sqlite") and parsed.drivername not in _ASYNC_DRIVERS:
        raise ValueError(f"unsupported database {parsed.drivername!r}: use postgresql or sqlite")
    if "+" not in parsed.drivername:
        parsed = parsed.set(drivername=_ASYNC_DRIVERS[parsed.drivername])
    if backend == "sqlite" and parsed.database and parsed.database.startswith("~"):
        parsed = parsed.set(database=str(Path(parsed.database).expanduser()))
    return parsed


def is_sqlite(url: URL) -> bool:
    """Whether the URL names an SQLite database."""
    return url.get_backend_name() == "sqlite"


def sqlite_path(url: URL) -> Path:
    """The file behind an SQLite URL; in-memory databases are refused (each connection would get its own)."""
    if not url.database or url.database == ":memory:" or url.database.startswith("file::memory:"):
        raise ValueError("SQLite needs a file path (sqlite:///path/to/db.sqlite), not an in-memory database")
    return Path(url.database)


def make_engine(url: str | URL, **options: Any) -> AsyncEngine:
    """An async engine for `url`; SQLite gets WAL, foreign keys and a busy timeout, and its directory."""
    parsed = normalize_url(url)
    if is_sqlite(parsed):
        sqlite_path(parsed).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(parsed, **options)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    options.setdefault("pool_pre_ping", names_several_hosts(parsed))
    engine = create_async_engine(parsed, **options)
    event.listen(engine.sync_engine, "do_connect", _connect_or_unavailable)
    event.listen(engine.sync_engine, "handle_error", _unavailable_when_disconnected)
    return engine


def names_several_hosts(url: URL) -> bool:
    """Whether a Postgres URL lists several servers (`?host=a:1&host=b:2` or `?host=a:1,b:2`)."""
    hosts = url.query.get("host")
    if isinstance(hosts, tuple):
        return len(hosts) > 1 or any("," in h for h in hosts)
    return isinstance(hosts, str) and "," in hosts


def _database_unavailable():
    from shared.errors import Unavailable

    return Unavailable(
        "lost the connection to the database (a failover?); retry later", reason="DATABASE_UNAVAILABLE", retry_after=1.0
    )


def _connect_or_unavailable(dialect: Any, conn_rec: Any, cargs: Any, cparams: Any) -> Any:
    """Connect as SQLAlchemy would; a refused or timed-out socket (which the asyncpg dialect passes
    on untranslated, past handle_error) becomes Unavailable."""
    try:
        return dialect.connect(*cargs, **cparams)
    except (OSError, TimeoutError) as exc:
        raise _database_unavailable() from exc


def _unavailable_when_disconnected(ctx: ExceptionContext) -> None:
    """Raise a lost or refused database connection as Unavailable (the pool has already
    invalidated it). A failed pre-ping is left alone: the pool replaces the connection itself."""
    if ctx.is_pre_ping or not (ctx.is_disconnect or ctx.connection is None):
        return
    if isinstance(ctx.original_exception, asyncio.CancelledError):  # a stop, not a lost server: stay cancelled
        return
    raise _database_unavailable() from ctx.original_exception


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()

"""Reads from a streaming replica, with read-your-writes by WAL position (LSN).

A write RPC answers with the primary's WAL insert position after its commit (`x-bulkhead-lsn`,
trailing metadata); a caller that must see its write sends that position back on its read. The
read then runs on the replica only once the replica has replayed that far (polled for at most
`wait` seconds), else on the primary. A read without a position goes to the replica as it is.

The standby of a cluster holds every database and schema of it, so bridge schemas and silo
databases are read there too; one the standby has not replayed yet is read on the primary.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from sqlalchemy import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db.engine import make_engine
from shared.db.router import Route

log = logging.getLogger("bulkhead.db")

LSN_HEADER = "x-bulkhead-lsn"
"""Metadata key: a WAL position, `X/Y` hex as Postgres prints a pg_lsn."""

_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
_read_after: ContextVar[int | None] = ContextVar("bulkhead_read_after_lsn", default=None)

INSERT_LSN = "SELECT pg_current_wal_insert_lsn()::text"
"""On the primary, after a commit: a position at or past that commit's WAL record."""


def parse_lsn(value: str | None) -> int | None:
    """A pg_lsn text as a number (comparable), or None when absent or malformed."""
    match = _LSN.match(value.strip()) if value else None
    return (int(match.group(1), 16) << 32 | int(match.group(2), 16)) if match else None


def format_lsn(lsn: int) -> str:
    """A number from parse_lsn as pg_lsn text."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def lsn_from(metadata: Iterable[tuple[str, Any]] | None) -> int | None:
    """The highest well-formed LSN a call's metadata carries, or None."""
    found = [parse_lsn(v) for k, v in (metadata or ()) if k == LSN_HEADER and isinstance(v, str)]
    return max((lsn for lsn in found if lsn is not None), default=None)


@contextmanager
def reading_after(lsn: int | None) -> Iterator[None]:
    """Reads inside see every write up to `lsn` (None: any replica state will do)."""
    token = _read_after.set(lsn)
    try:
        yield
    finally:
        _read_after.reset(token)


def required_lsn() -> int | None:
    """The LSN the current call's reads must reflect, if any."""
    return _read_after.get()


class ReplicaRoutes:
    """The replica's twin of each primary Route: same schema, same database, the standby's host."""

    def __init__(self, engine: AsyncEngine, url: URL, engine_options: dict[str, Any]) -> None:
        self.engine = engine
        self._url = url
        self._options = engine_options
        self._silos: dict[str, AsyncEngine] = {}

    def route(self, primary: Route, main: AsyncEngine) -> Route:
        """The Route on the replica for a tenant whose primary Route is `primary`."""
        if primary.bind is main:
            return Route(self.engine)
        if primary.schema:
            return Route(self.engine.execution_options(schema_translate_map={None: primary.schema}), primary.schema)
        database = primary.bind.url.database or ""
        engine = self._silos.get(database)
        if engine is None:  # a silo database: the same name on the standby's server
            engine = self._silos[database] = make_engine(self._url.set(database=database), **self._options)
        return Route(engine)

    async def close(self) -> None:
        """Dispose of the replica engines."""
        silos, self._silos = list(self._silos.values()), {}
        for engine in silos:
            await engine.dispose()
        await self.engine.dispose()


def reads_after_caller(context: Any) -> Any:
    """In a read RPC: `with reads_after_caller(context):` makes its reads reflect the LSN the caller sent."""
    return reading_after(lsn_from(context.invocation_metadata()))


async def answer_with_lsn(db: Any, context: Any) -> None:
    """In a write RPC, after its commit: the WAL position goes back in trailing metadata, so the
    caller's next read can ask for it (nothing without a replica)."""
    try:
        lsn = await db.written_lsn()
    except Exception:  # the write is committed: never report it failed; the next read may be stale
        log.warning("could not read the WAL position after a write", exc_info=True)
        return
    if lsn is not None:
        context.set_trailing_metadata(((LSN_HEADER, lsn),))

"""The security-events ledger of one service: counts of refused calls in the service's main database.

One table, `bulkhead_security_events`, in the main database of the tenant's region whatever its
tier (data residency: with one region, the service's main database): it is keyed by tenant,
service, minute, method, reason and principal and holds a
count and the last time seen; nothing about the call's content, and never a token. Tenant rows are
written and read under row-level security (app.tenant_id set per tenant); the retention sweep, which
names no tenant, may delete only rows the database itself finds past retention (a policy of its own).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import BigInteger, Column, Index, MetaData, PrimaryKeyConstraint, String, Table
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from shared.db import Database, upgrade
from shared.db.base import NAMING_CONVENTION
from shared.db.raw import raw_transaction
from shared.db.rls import _GRANT_LOCK, quote_ident
from shared.errors import NotFound
from shared.lifecycle import REGION_MAIN

log = logging.getLogger("bulkhead.security")

TABLE = "bulkhead_security_events"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
"""The ledger's own Alembic migrations (version table alembic_version_security_events), run on each
service's main database next to the service's own."""
RETENTION_S = 30 * 86400
"""How long a refused call is kept (the migration's retention policy says the same)."""
RETENTION_SWEEPER = "security-events-retention"
"""The app.tenant_id of the retention sweep: never a tenant id (those start with t_)."""

METADATA = MetaData(naming_convention=NAMING_CONVENTION)
"""The ledger's table, for the tenant lifecycle (inventory, purge) of every service."""
EVENTS = Table(
    TABLE,
    METADATA,
    Column("tenant_id", String(64), nullable=False),
    Column("service", String(32), nullable=False),
    Column("bucket_start", BigInteger, nullable=False),
    Column("method", String(200), nullable=False),
    Column("reason", String(64), nullable=False),
    Column("principal_id", String(64), nullable=False),
    Column("count", BigInteger, nullable=False),
    Column("last_seen_us", BigInteger, nullable=False),
    PrimaryKeyConstraint("tenant_id", "service", "bucket_start", "method", "reason", "principal_id"),
    Index("ix_bulkhead_security_events_bucket_start", "bucket_start"),
    info={REGION_MAIN: True},
)


@dataclass(frozen=True)
class Refusal:
    """One key of refused calls and how many there were (what a flush writes)."""

    tenant_id: str
    """The tenant whose verified token was refused."""
    bucket_start: int
    """The minute (epoch seconds, UTC) they fell in."""
    method: str
    """The full gRPC method path."""
    reason: str
    """The ErrorInfo reason the caller got."""
    principal_id: str
    """The principal the token was issued to."""
    count: int
    """How many calls."""
    last_seen_us: int
    """When the last one was refused (epoch microseconds)."""


@dataclass(frozen=True)
class EventRow:
    """One row read back for a tenant."""

    service: str
    method: str
    reason: str
    principal_id: str
    bucket_start: int
    count: int
    last_seen_us: int


_UPSERT = (
    f"INSERT INTO {TABLE} (tenant_id, service, bucket_start, method, reason, principal_id, count, "
    "last_seen_us) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
    "ON CONFLICT (tenant_id, service, bucket_start, method, reason, principal_id) DO UPDATE SET "
    f"count = {TABLE}.count + excluded.count, last_seen_us = {{larger}}({TABLE}.last_seen_us, "
    "excluded.last_seen_us)"
)
_LARGER = {"postgresql": "GREATEST", "sqlite": "MAX"}


class SecurityLedger:
    """Writes, reads and sweeps one service's rows of the security-events table."""

    def __init__(self, service: str, db: Database, *, clock=time.time) -> None:
        self.service = service
        self._db = db
        self._clock = clock

    async def migrate(self) -> None:
        """Bring the table to head in every region's main database (as its owner); grant the runtime role DML."""
        for _engine, owner, app_role in _region_stores(self._db):
            await asyncio.to_thread(upgrade, owner, MIGRATIONS)
            if owner.get_backend_name() != "postgresql" or not app_role:
                continue
            admin = create_async_engine(owner, poolclass=NullPool)
            try:
                async with admin.begin() as conn:
                    # Six services may share one database and grant there too (shared.db.rls.grant_to): take
                    # the same lock, one at a time ("tuple concurrently updated").
                    await conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_GRANT_LOCK})")
                    await conn.exec_driver_sql(
                        f"GRANT SELECT, INSERT, UPDATE, DELETE ON {TABLE} TO {quote_ident(app_role)}"
                    )
            finally:
                await admin.dispose()

    async def _home(self, tenant_id: str):
        """The engine of the tenant's region's main database (the only one with a single region)."""
        main_route = getattr(self._db.router, "main_route", None)
        return (await main_route(tenant_id)).bind if main_route is not None else self._db.engine

    async def write(self, refusals: Sequence[Refusal]) -> None:
        """Add the counts in one transaction, each tenant's rows under its own app.tenant_id."""
        if not refusals:
            return
        by_home: dict = {}
        homes: dict[str, AsyncEngine | None] = {}
        for r in refusals:  # data residency: each tenant's rows go to its region's main database
            if r.tenant_id not in homes:
                try:
                    homes[r.tenant_id] = await self._home(r.tenant_id)
                except NotFound:  # identity knows no such tenant (any more): nobody to file it under
                    log.warning("%s: security events of unknown tenant %s dropped", self.service, r.tenant_id)
                    homes[r.tenant_id] = None
            if homes[r.tenant_id] is not None:
                by_home.setdefault(homes[r.tenant_id], {}).setdefault(r.tenant_id, []).append(r)
        for engine, by_tenant in by_home.items():
            sql = _UPSERT.format(larger=_LARGER.get(engine.dialect.name, "MAX"))
            async with raw_transaction(engine, tenant_id=None, write=True) as tx:
                for tenant_id, rows in sorted(by_tenant.items()):
                    if tx.dialect == "postgresql":
                        await tx.execute("SELECT set_config('app.tenant_id', $1, true)", tenant_id)
                    await tx.executemany(
                        sql,
                        [
                            (
                                r.tenant_id,
                                self.service,
                                r.bucket_start,
                                r.method,
                                r.reason,
                                r.principal_id,
                                r.count,
                                r.last_seen_us,
                            )
                            for r in rows
                        ],
                    )

    async def read(
        self, tenant_id: str, *, start: int, end: int, reasons: Sequence[str], after: tuple | None, limit: int
    ) -> list[EventRow]:
        """The tenant's rows of this service with start <= minute < end, newest minute first, after a cursor."""
        start = max(start, int(self._clock()) - RETENTION_S)
        args: list = [tenant_id, self.service, start, end]
        where = "tenant_id = $1 AND service = $2 AND bucket_start >= $3 AND bucket_start < $4"
        if reasons:
            marks = ", ".join(f"${len(args) + i + 1}" for i in range(len(reasons)))
            where += f" AND reason IN ({marks})"
            args += list(reasons)
        if after is not None:
            n = len(args)
            # Keyset: bucket descending, then method, reason, principal ascending.
            where += (
                f" AND (bucket_start < ${n + 1} OR (bucket_start = ${n + 1} AND (method, reason, principal_id)"
                f" > (${n + 2}, ${n + 3}, ${n + 4})))"
            )
            args += list(after)
        sql = (
            f"SELECT service, method, reason, principal_id, bucket_start, count, last_seen_us FROM {TABLE} "
            f"WHERE {where} ORDER BY bucket_start DESC, method, reason, principal_id LIMIT {int(limit)}"
        )
        async with raw_transaction(await self._home(tenant_id), tenant_id=tenant_id) as tx:
            rows = await tx.fetch(sql, *args)
        return [EventRow(*row) for row in rows]

    async def sweep(self) -> int:
        """Delete every tenant's rows of this service past retention; how many went."""
        cutoff = int(self._clock()) - RETENTION_S
        gone = 0
        for engine, _owner, _role in _region_stores(self._db):
            async with raw_transaction(engine, tenant_id=RETENTION_SWEEPER, write=True) as tx:
                gone += await tx.execute(
                    f"DELETE FROM {TABLE} WHERE service = $1 AND bucket_start < $2", self.service, cutoff
                )
        if gone:
            log.info("%s: swept %d security-event rows past %d days", self.service, gone, RETENTION_S // 86400)
        return gone


def _region_stores(db: Database) -> list[tuple[AsyncEngine, URL, str | None]]:
    """(runtime engine, owner URL, runtime role to grant to) of every region's main database, as the
    tier router keeps them (one entry without data residency)."""
    router = db.router
    regions = getattr(router, "_regions", None)
    if regions:
        return [(s.engine, s.owner_url or s.url, s.app_role) for s in regions.values()]
    url = getattr(router, "_owner_url", None) or getattr(router, "_url", None) or db.engine.url
    return [(db.engine, url, getattr(router, "_app_role", None))]

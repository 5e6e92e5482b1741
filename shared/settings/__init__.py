"""A service's own settings in its platform database: values every replica must share, made once.

One table, `bulkhead_settings` (service, name, value), next to the service's tables in the main
database of its default region; six services may share that database, so rows are keyed by service.
It holds no tenant data. The first use of a setting writes a random value; every later start and
every other replica reads that same value.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

from sqlalchemy import Column, MetaData, PrimaryKeyConstraint, String, Table, Text, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from shared.db import Database, upgrade
from shared.db.base import NAMING_CONVENTION

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
"""The settings table's own Alembic migrations (version table alembic_version_settings)."""

METADATA = MetaData(naming_convention=NAMING_CONVENTION)

SETTINGS = Table(
    "bulkhead_settings",
    METADATA,
    Column("service", String(32), nullable=False),
    Column("name", String(64), nullable=False),
    Column("value", Text, nullable=False),
    PrimaryKeyConstraint("service", "name"),
)

PAGE_KEY = "page_token_key"
"""The setting that holds the service's page-token HMAC key (shared.paging)."""


async def random_setting(db: Database, service: str, name: str, *, nbytes: int = 32) -> str:
    """The setting's value, made at random (hex) by whichever replica asks first; the same ever after.

    Runs as the table owner (the runtime role gets no grant: only startup reads it)."""
    router = db.router
    regions = getattr(router, "_regions", None)
    store = regions[getattr(router, "_default_region", "")] if regions else None
    owner = (store.owner_url or store.url) if store is not None else db.engine.url
    await asyncio.to_thread(upgrade, owner, MIGRATIONS)
    engine = create_async_engine(owner, poolclass=NullPool) if store is not None and store.owner_url else db.engine
    query = select(SETTINGS.c.value).where(SETTINGS.c.service == service, SETTINGS.c.name == name)
    try:
        async with engine.begin() as conn:
            value = (await conn.execute(query)).scalar_one_or_none()
            if value is not None:
                return value
        try:
            async with engine.begin() as conn:
                await conn.execute(
                    SETTINGS.insert().values(service=service, name=name, value=secrets.token_hex(nbytes))
                )
        except IntegrityError:
            pass  # another replica made it first: use that one
        async with engine.begin() as conn:
            return (await conn.execute(query)).scalar_one()
    finally:
        if engine is not db.engine:
            await engine.dispose()


async def load_page_key(db: Database, service: str) -> bytes:
    """The service's page-token key: random, made once, shared by every replica, surviving restarts."""
    return bytes.fromhex(await random_setting(db, service, PAGE_KEY))

"""Fixtures for the metering tests: a real server on port 0 with the production interceptors."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from bulkhead.metering.v1 import metering_pb2_grpc
from services.metering.server import MIGRATIONS, MeteringService, serve_metering
from shared.client import make_channel
from shared.db import Database
from testkit.tokens import TestTokens

from .helpers import OPERATOR, FakeClock


@dataclass
class Harness:
    """A running metering service, its clock, tokens and a stub."""

    service: MeteringService
    tokens: TestTokens
    clock: FakeClock
    stub: metering_pb2_grpc.MeteringServiceStub
    registry: CollectorRegistry

    def md(self, tenant_id: str, scopes=("*",), **kw) -> tuple[tuple[str, str], ...]:
        """Call metadata for a tenant."""
        return self.tokens.metadata(tenant_id, scopes, **kw)

    def op(self) -> tuple[tuple[str, str], ...]:
        """Call metadata for a platform operator."""
        return self.tokens.metadata(OPERATOR, ("platform.operator",), principal_id="p_operator")


async def start_harness(db: Database) -> tuple[Harness, object]:
    """Serve metering over db; returns the harness and its channel (close both)."""
    tokens, clock, registry = TestTokens(), FakeClock(), CollectorRegistry()
    service = await serve_metering(db=db, verifier=tokens.verifier, clock=clock, registry=registry, price_cache_s=0)
    channel = make_channel(service.running.address)
    return Harness(service, tokens, clock, metering_pb2_grpc.MeteringServiceStub(channel), registry), channel


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory) -> Path:
    """An SQLite file migrated once per session; each test gets a copy (migrating costs more than the test)."""
    path = tmp_path_factory.mktemp("metering-template") / "metering.db"

    async def migrate() -> None:
        db = await Database.open(f"sqlite+aiosqlite:///{path}", migrations=str(MIGRATIONS))
        await db.close()

    asyncio.run(migrate())
    return path


@pytest.fixture
async def metering(tmp_path, migrated_sqlite) -> AsyncIterator[Harness]:
    """Metering on an embedded SQLite database."""
    shutil.copy(migrated_sqlite, tmp_path / "metering.db")
    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'metering.db'}")
    harness, channel = await start_harness(db)
    try:
        yield harness
    finally:
        await channel.close()
        await harness.service.stop(grace=0)


@pytest.fixture
async def pg_metering(postgres) -> AsyncIterator[Harness]:
    """Metering on a fresh Postgres database, as the runtime role (RLS applies)."""
    urls = await postgres.create_database("metering")
    db = await Database.open(urls.app_url, migrations=str(MIGRATIONS), owner_url=urls.owner_url, pool_size=10)
    harness, channel = await start_harness(db)
    harness.urls = urls
    try:
        yield harness
    finally:
        await channel.close()
        await harness.service.stop(grace=0)

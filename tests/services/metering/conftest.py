"""Fixtures for the metering tests: a real server on port 0 with the production interceptors."""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry

from bulkhead.metering.v1 import metering_pb2_grpc
from services.metering.server import MIGRATIONS, MeteringService, serve_metering
from shared.client import make_channel
from shared.db import Database
from shared.testing.tokens import TestTokens

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


@pytest.fixture
async def metering(tmp_path) -> AsyncIterator[Harness]:
    """Metering on an embedded SQLite database."""
    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'metering.db'}", migrations=str(MIGRATIONS))
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



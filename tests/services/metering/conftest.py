"""Fixtures for the metering tests: a real server on port 0 with the production interceptors."""
from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry

from bulkhead.metering.v1 import metering_pb2 as pb
from bulkhead.metering.v1 import metering_pb2_grpc
from services.metering import periods
from services.metering.server import MIGRATIONS, MeteringService, serve_metering
from shared.client import make_channel
from shared.db import Database
from shared.testing.tokens import TestTokens

T0 = periods.from_datetime(dt.datetime(2026, 3, 10, 12, 0, tzinfo=dt.timezone.utc))
"""The fake clock's start: mid-month, mid-day, so periods are easy to reason about."""

OPERATOR = "t_platform"


class FakeClock:
    """A clock the test moves by hand (no sleeping, no wall-clock assertions)."""

    def __init__(self, start_us: int = T0):
        self.now = start_us

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += int(seconds * periods.US_PER_SECOND)


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


def ts(us: int):
    """Epoch microseconds as a Timestamp."""
    from services.metering.wire import timestamp

    return timestamp(us)


def event(key: str, *, model: str = "claude-test", at_us: int = T0, input_tokens: int = 100, output_tokens: int = 10,
          cache_write: int = 0, cache_read: int = 0, agent_id: str = "", principal_id: str = "",
          outcome: int = pb.OUTCOME_SUCCESS) -> pb.UsageEvent:
    """A usage event."""
    return pb.UsageEvent(idempotency_key=key, model=model, occur_time=ts(at_us), agent_id=agent_id,
                         principal_id=principal_id, outcome=outcome,
                         tokens=pb.TokenCounts(input_tokens=input_tokens, output_tokens=output_tokens,
                                               cache_write_tokens=cache_write, cache_read_tokens=cache_read))


def price(model: str, at_us: int, input_micros: int, output_micros: int, cache_write: int = 0,
          cache_read: int = 0) -> pb.Price:
    """A price version."""
    return pb.Price(model=model, effective_time=ts(at_us), input_micros_per_mtok=input_micros,
                    output_micros_per_mtok=output_micros, cache_write_micros_per_mtok=cache_write,
                    cache_read_micros_per_mtok=cache_read)


def day_range(start_us: int = T0 - 30 * periods.US_PER_DAY, days: int = 60) -> pb.UsageFilter:
    """A wide filter around T0."""
    return pb.UsageFilter(start_time=ts(start_us), end_time=ts(start_us + days * periods.US_PER_DAY))

"""Fixtures for the state service tests: real servers on port 0, real databases, real tokens."""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from sqlalchemy import text

from bulkhead.state.v1 import state_pb2, state_pb2_grpc
from services.state.datakeys import LocalDataKeyProvider
from services.state.envelope import Envelope, PlaintextEnvelope
from services.state.records import Limits
from services.state.server import MIGRATIONS, make_envelope, serve_state
from shared.db import Database, upgrade
from shared.errors import error_details
from shared.server import RunningServer
from testkit.tokens import TestTokens

ALPHA = "t_alpha"
BETA = "t_beta"

# Small limits so the limit tests need no megabyte payloads.
TEST_LIMITS = Limits(
    max_event_bytes=1024,
    max_events_per_append=20,
    max_snapshot_bytes=4096,
    max_value_bytes=512,
    default_page_size=10,
    max_page_size=50,
    replay_batch=7,
)


@dataclass
class StateHarness:
    """A running state server, a stub to it, and raw access to its database for assertions."""

    db: Database
    running: RunningServer
    channel: grpc.aio.Channel
    stub: state_pb2_grpc.StateServiceStub
    tokens: TestTokens
    envelope: Envelope | PlaintextEnvelope
    backend: str
    extra: dict = field(default_factory=dict)

    def md(self, tenant: str = ALPHA, scopes=("*",), **kw) -> tuple[tuple[str, str], ...]:
        """Call metadata for `tenant`."""
        return self.tokens.metadata(tenant, scopes, **kw)

    async def raw(self, sql: str, params: dict | None = None, *, tenant: str | None = None) -> list:
        """Raw SQL straight on the engine, past the ORM (on Postgres, as `tenant` for RLS)."""
        async with self.db.engine.connect() as conn, conn.begin():
            if tenant is not None and self.backend == "postgres":
                await conn.execute(text("SELECT set_config('app.tenant_id', :t, true)"), {"t": tenant})
            result = await conn.execute(text(sql), params or {})
            return list(result.all()) if result.returns_rows else []

    async def new_thread(self, tenant: str = ALPHA, **fields) -> state_pb2.Thread:
        """Create a thread for `tenant`."""
        reply = await self.stub.CreateThread(state_pb2.CreateThreadRequest(**fields), metadata=self.md(tenant))
        return reply.thread

    async def append(
        self, thread_id: str, *payloads: bytes, tenant: str = ALPHA, expected: int | None = None, type: str = "message"
    ) -> state_pb2.AppendEventsResponse:
        """Append payloads as events of `type`."""
        request = state_pb2.AppendEventsRequest(
            thread_id=thread_id, events=[state_pb2.NewEvent(type=type, payload=p) for p in payloads]
        )
        if expected is not None:
            request.expected_version = expected
        return await self.stub.AppendEvents(request, metadata=self.md(tenant))


async def expect_error(code: grpc.StatusCode, call) -> dict:
    """Await a call that must fail with `code`; its decoded google.rpc details."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return error_details(info.value)


async def replay(h: StateHarness, thread_id: str, tenant: str = ALPHA, **kw) -> list:
    """Every item of a Replay stream."""
    call = h.stub.Replay(state_pb2.ReplayRequest(thread_id=thread_id, **kw), metadata=h.md(tenant))
    return [item async for item in call]


async def open_database(request: pytest.FixtureRequest, backend: str, tmp_path) -> tuple[Database, dict]:
    """A migrated state database on `backend`, as the runtime role."""
    if backend == "sqlite":
        # Migrating takes a few hundred ms: do it once per session, then copy the file.
        template = request.getfixturevalue("sqlite_template")
        shutil.copyfile(template, tmp_path / "state.db")
        url = f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
        return await Database.open(url), {"url": url, "owner_url": None}
    server = request.getfixturevalue("postgres")
    urls = await server.create_database("state")
    db = await Database.open(urls.app_url, migrations=str(MIGRATIONS), owner_url=urls.owner_url)
    return db, {"url": urls.app_url, "owner_url": urls.owner_url, "urls": urls}


async def start_harness(
    db: Database, tokens: TestTokens, backend: str, *, master_key: bytes | None, limits: Limits = TEST_LIMITS
) -> StateHarness:
    """Serve the state service over `db` (encrypted with a local master key unless it is None)."""
    provider = LocalDataKeyProvider(master_key) if master_key is not None else None
    envelope = make_envelope(db, provider)
    running = await serve_state(db=db, envelope=envelope, verifier=tokens.verifier, limits=limits)
    channel = grpc.aio.insecure_channel(running.address)
    return StateHarness(db, running, channel, state_pb2_grpc.StateServiceStub(channel), tokens, envelope, backend)


async def stop_harness(h: StateHarness) -> None:
    """Stop the server and close the channel (the database stays open)."""
    await h.channel.close()
    await h.running.stop(0)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> pathlib.Path:
    """An SQLite file migrated to head by the real migrations, copied by each test."""
    path = tmp_path_factory.mktemp("state-template") / "state.db"
    # upgrade() runs its own event loop, and this may be asked for from inside a running one.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(upgrade, f"sqlite+aiosqlite:///{path}", MIGRATIONS).result()
    return path


@pytest.fixture
def tokens() -> TestTokens:
    """Tokens for any tenant, verified by the server under test."""
    return TestTokens()


@pytest.fixture
def master_key() -> bytes:
    """The local provider's master key."""
    return os.urandom(32)


@pytest.fixture
async def state(request, tmp_path, tokens, master_key) -> AsyncIterator[StateHarness]:
    """The state service on SQLite (fast: most behaviour tests)."""
    db, info = await open_database(request, "sqlite", tmp_path)
    h = await start_harness(db, tokens, "sqlite", master_key=master_key)
    h.extra.update(info, master_key=master_key)
    yield h
    await stop_harness(h)
    await db.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def any_state(request, tmp_path, tokens, master_key) -> AsyncIterator[StateHarness]:
    """The state service on each backend in turn (isolation and encryption tests)."""
    db, info = await open_database(request, request.param, tmp_path)
    h = await start_harness(db, tokens, request.param, master_key=master_key)
    h.extra.update(info, master_key=master_key)
    yield h
    await stop_harness(h)
    await db.close()


@pytest.fixture
async def pg_state(request, tmp_path, tokens, master_key) -> AsyncIterator[StateHarness]:
    """The state service on Postgres with RLS, as the runtime role."""
    db, info = await open_database(request, "postgres", tmp_path)
    h = await start_harness(db, tokens, "postgres", master_key=master_key)
    h.extra.update(info, master_key=master_key)
    yield h
    await stop_harness(h)
    await db.close()

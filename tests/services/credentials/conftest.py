"""Fixtures for the credentials tests: a real server on port 0 with the production interceptors,
a real SQLite database, and either backend (the local one, or a real OpenBao dev server)."""

from __future__ import annotations

import secrets
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from sqlalchemy import text

from bulkhead.credentials.v1 import credentials_pb2 as pb
from bulkhead.credentials.v1 import credentials_pb2_grpc
from services.credentials.local_backend import LocalBackend
from services.credentials.master_key import load_or_create_master_key
from services.credentials.rotation import RotatorRegistry
from services.credentials.server import (
    MIGRATIONS,
    CredentialsService,
    serve_credentials,
)
from services.credentials.vault_backend import VaultBackend
from shared.client import make_channel
from shared.db import Database, upgrade
from shared.errors import error_details
from testkit.tokens import TestTokens

BACKENDS = ["local", "vault"]


def new_tenant(prefix: str = "t") -> str:
    """A fresh tenant id, so tests sharing the session's OpenBao never meet."""
    return f"t_{prefix}{secrets.token_hex(4)}"


@dataclass
class Harness:
    """A running credentials server, a stub to it, two tenants, and raw database access."""

    service: CredentialsService
    channel: grpc.aio.Channel
    stub: credentials_pb2_grpc.CredentialsServiceStub
    tokens: TestTokens
    kind: str
    alpha: str
    beta: str

    def md(self, tenant: str | None = None, scopes=("*",), **kw) -> tuple[tuple[str, str], ...]:
        """Call metadata for `tenant` (alpha by default)."""
        return self.tokens.metadata(tenant or self.alpha, scopes, **kw)

    async def put(self, name: str, value: bytes, tenant: str | None = None, **fields) -> pb.Secret:
        """PutSecret as `tenant`."""
        reply = await self.stub.PutSecret(
            pb.PutSecretRequest(name=name, value=value, **fields), metadata=self.md(tenant)
        )
        return reply.secret

    async def get(self, name: str, tenant: str | None = None, version: int = 0) -> pb.GetSecretResponse:
        """GetSecret as `tenant`."""
        return await self.stub.GetSecret(pb.GetSecretRequest(name=name, version=version), metadata=self.md(tenant))

    async def events(self, tenant: str | None = None, **fields) -> list[pb.AccessEvent]:
        """Every audit event of `tenant`."""
        reply = await self.stub.ListAccessEvents(
            pb.ListAccessEventsRequest(page_size=1000, **fields), metadata=self.md(tenant)
        )
        return list(reply.events)

    async def raw(self, sql: str, params: dict | None = None) -> list:
        """Raw SQL on the service's database, past the ORM (what an attacker with the file sees)."""
        async with self.service.db.engine.connect() as conn, conn.begin():
            result = await conn.execute(text(sql), params or {})
            return list(result.all()) if result.returns_rows else []


async def expect_error(code: grpc.StatusCode, call) -> tuple[dict, str]:
    """Await a call that must fail with `code`; its google.rpc details and message."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return error_details(info.value), info.value.details() or ""


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory) -> str:
    """A migrated SQLite file, copied for each test (migrating once keeps the suite fast)."""
    path = tmp_path_factory.mktemp("cred-template") / "credentials.db"
    upgrade(f"sqlite+aiosqlite:///{path}", MIGRATIONS)
    return str(path)


async def open_db(tmp_path, migrated_template: str) -> Database:
    """A fresh database for one test."""
    path = tmp_path / "credentials.db"
    shutil.copy(migrated_template, path)
    # Migrations named (a no-op on the copy) so bridge/silo tenants can get tables of their own.
    return await Database.open(f"sqlite+aiosqlite:///{path}", migrations=MIGRATIONS)


def make_test_backend(kind: str, db: Database, tmp_path, openbao=None):
    """The backend under test."""
    if kind == "vault":
        return VaultBackend(openbao.url, openbao.root_token, token_ttl_seconds=300)
    return LocalBackend(db, load_or_create_master_key(tmp_path / "keys" / "master.key"))


async def start_harness(
    kind: str,
    tmp_path,
    migrated_template: str,
    openbao=None,
    *,
    rotators: RotatorRegistry | None = None,
    grace_seconds: int = 86400,
) -> Harness:
    """Database, backend, server and a channel to it."""
    db = await open_db(tmp_path, migrated_template)
    backend = make_test_backend(kind, db, tmp_path, openbao)
    service = await serve_credentials(
        db=db,
        backend=backend,
        verifier=TOKENS.verifier,
        rotators=rotators,
        grace_seconds=grace_seconds,
        audit_key=AUDIT_KEY,
    )
    channel = make_channel(service.running.address)
    return Harness(
        service,
        channel,
        credentials_pb2_grpc.CredentialsServiceStub(channel),
        TOKENS,
        kind,
        new_tenant("a"),
        new_tenant("b"),
    )


async def stop_harness(h: Harness) -> None:
    """Close the channel and stop the service."""
    await h.channel.close()
    await h.service.stop(grace=0.5)


TOKENS = TestTokens()
AUDIT_KEY = secrets.token_bytes(32)


@pytest.fixture(params=BACKENDS)
async def h(request, tmp_path, migrated_template) -> AsyncIterator[Harness]:
    """A harness for each backend (the vault one on the session's OpenBao dev server)."""
    openbao = request.getfixturevalue("openbao") if request.param == "vault" else None
    harness = await start_harness(request.param, tmp_path, migrated_template, openbao)
    try:
        yield harness
    finally:
        await stop_harness(harness)


@pytest.fixture
async def vh(tmp_path, migrated_template, openbao) -> AsyncIterator[Harness]:
    """A harness on the vault backend only."""
    harness = await start_harness("vault", tmp_path, migrated_template, openbao)
    try:
        yield harness
    finally:
        await stop_harness(harness)


@pytest.fixture
async def lh(tmp_path, migrated_template) -> AsyncIterator[Harness]:
    """A harness on the local backend only."""
    harness = await start_harness("local", tmp_path, migrated_template)
    try:
        yield harness
    finally:
        await stop_harness(harness)

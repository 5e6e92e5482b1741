"""Envelope encryption against the real credentials service (local backend and OpenBao Transit).

The state server gets its data keys from a real credentials server over gRPC, forwarding the
caller's own token, so each tenant's data key is wrapped by that tenant's own key there.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import grpc
import pytest

from bulkhead.credentials.v1 import credentials_pb2, credentials_pb2_grpc
from bulkhead.state.v1 import state_pb2, state_pb2_grpc
from services.credentials.local_backend import LocalBackend
from services.credentials.master_key import load_or_create_master_key
from services.credentials.server import MIGRATIONS as CREDENTIALS_MIGRATIONS
from services.credentials.server import serve_credentials
from services.credentials.vault_backend import VaultBackend
from services.state.peers import CredentialsDataKeyProvider
from services.state.server import make_envelope, serve_state
from shared.client import make_channel
from shared.db import Database
from tests.services.state.conftest import (
    TEST_LIMITS,
    StateHarness,
    expect_error,
    open_database,
    replay,
)

SECRET = b"CREDENTIALS-WRAPPED-SECRET"


class Mesh:
    """A credentials server and a state server that takes its data keys from it."""

    def __init__(self, request, tmp_path, tokens, backend: str):
        self.request, self.tmp_path, self.tokens, self.backend = request, tmp_path, tokens, backend
        # Fresh tenant ids: the session's OpenBao is shared with other suites.
        self.alpha, self.beta = f"t_sa{secrets.token_hex(4)}", f"t_sb{secrets.token_hex(4)}"

    async def start_credentials(self) -> None:
        """Start credentials with the chosen backend."""
        self.cred_db = await Database.open(
            f"sqlite+aiosqlite:///{self.tmp_path / 'cred.db'}", migrations=str(CREDENTIALS_MIGRATIONS)
        )
        if self.backend == "vault":
            bao = self.request.getfixturevalue("openbao")
            backend = VaultBackend(bao.url, bao.root_token, token_ttl_seconds=300)
        else:
            backend = LocalBackend(self.cred_db, load_or_create_master_key(self.tmp_path / "cred-master.key"))
        self.credentials = await serve_credentials(db=self.cred_db, backend=backend, verifier=self.tokens.verifier)
        self.cred_channel = make_channel(self.credentials.running.address)
        self.cred_stub = credentials_pb2_grpc.CredentialsServiceStub(self.cred_channel)

    async def start_state(self, db: Database | None = None) -> StateHarness:
        """Start state with the credentials-backed provider (a fresh envelope: empty key cache)."""
        if db is None:
            db, _ = await open_database(self.request, "sqlite", self.tmp_path)
        self.key_channel = make_channel(self.credentials.running.address, forward=True)
        envelope = make_envelope(db, CredentialsDataKeyProvider(self.key_channel, timeout=3.0))
        running = await serve_state(db=db, envelope=envelope, verifier=self.tokens.verifier, limits=TEST_LIMITS)
        channel = grpc.aio.insecure_channel(running.address)
        self.state = StateHarness(
            db, running, channel, state_pb2_grpc.StateServiceStub(channel), self.tokens, envelope, "sqlite"
        )
        return self.state

    async def stop_state(self) -> None:
        """Stop state (keeping its database open)."""
        await self.state.channel.close()
        await self.state.running.stop(0)
        await self.key_channel.close()

    async def stop(self) -> None:
        """Stop both services."""
        await self.stop_state()
        await self.state.db.close()
        await self.cred_channel.close()
        await self.credentials.stop(grace=0)


@pytest.fixture(params=["local", "vault"])
async def mesh(request, tmp_path, tokens) -> AsyncIterator[Mesh]:
    """Credentials (local backend, then OpenBao Transit) feeding a state server."""
    m = Mesh(request, tmp_path, tokens, request.param)
    await m.start_credentials()
    await m.start_state()
    yield m
    await m.stop()


async def test_data_keys_come_from_the_tenants_own_key(mesh: Mesh):
    """Writing creates a data key wrapped by credentials; the stored form is credentials ciphertext only."""
    h = mesh.state
    await h.new_thread(mesh.alpha, thread_id="t")
    await h.append("t", SECRET, tenant=mesh.alpha)
    assert [i.event.payload for i in await replay(h, "t", mesh.alpha)] == [SECRET]
    wrapped = bytes((await h.raw("SELECT wrapped FROM state_data_keys"))[0][0])
    payload = bytes((await h.raw("SELECT payload FROM state_events"))[0][0])
    assert SECRET not in payload
    if mesh.backend == "vault":
        assert wrapped.startswith(b"vault:v")  # an OpenBao Transit ciphertext
    # Only credentials can unwrap it, and only for its own tenant.
    plain = await mesh.cred_stub.Decrypt(credentials_pb2.DecryptRequest(ciphertext=wrapped), metadata=h.md(mesh.alpha))
    assert len(plain.plaintext) == 32
    details = await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        mesh.cred_stub.Decrypt(credentials_pb2.DecryptRequest(ciphertext=wrapped), metadata=h.md(mesh.beta)),
    )
    assert details["reason"] == "DECRYPTION_FAILED"


async def test_other_tenants_wrapped_key_does_not_open_its_data(mesh: Mesh):
    """A's data key row and events copied under B's tenant are unreadable for B (credentials refuses)."""
    h = mesh.state
    await h.new_thread(mesh.alpha, thread_id="t")
    await h.append("t", SECRET, tenant=mesh.alpha)
    await h.new_thread(mesh.beta, thread_id="t")
    # Someone with database access plants A's key and ciphertext into B's rows (SQLite: no RLS).
    await h.raw("UPDATE state_data_keys SET tenant_id = :b", {"b": mesh.beta})
    await h.raw("UPDATE state_events SET tenant_id = :b", {"b": mesh.beta})
    await h.raw("UPDATE state_threads SET version = 1 WHERE tenant_id = :b", {"b": mesh.beta})
    details = await expect_error(grpc.StatusCode.INTERNAL, replay(h, "t", mesh.beta))
    assert details["reason"] == "UNDECRYPTABLE_DATA"
    assert "CREDENTIALS" not in str(details)


async def test_replay_after_restart_unwraps_through_credentials(mesh: Mesh):
    """After a restart the plain key is gone from memory; replay unwraps it again via credentials."""
    h = mesh.state
    await h.new_thread(mesh.alpha, thread_id="t")
    payloads = [SECRET + bytes([i]) for i in range(12)]
    await h.append("t", *payloads, tenant=mesh.alpha)
    db = h.db
    await mesh.stop_state()
    h = await mesh.start_state(db)
    assert [i.event.payload for i in await replay(h, "t", mesh.alpha)] == payloads


async def test_token_without_key_scopes_cannot_write(mesh: Mesh):
    """The forwarded token needs credentials.keys.*: without it the write is PERMISSION_DENIED, nothing stored."""
    h = mesh.state
    await h.new_thread(mesh.alpha, thread_id="t")
    md = h.md(mesh.alpha, scopes=("state.*",))
    details = await expect_error(
        grpc.StatusCode.PERMISSION_DENIED,
        h.stub.AppendEvents(
            state_pb2.AppendEventsRequest(thread_id="t", events=[state_pb2.NewEvent(type="m", payload=SECRET)]),
            metadata=md,
        ),
    )
    assert details["reason"] == "DATA_KEY_DENIED"
    assert (await h.raw("SELECT count(*) FROM state_events"))[0][0] == 0


async def test_credentials_down_is_unavailable(request, tmp_path, tokens):
    """With credentials unreachable and no cached key, writes fail UNAVAILABLE with a retry hint."""
    m = Mesh(request, tmp_path, tokens, "local")
    await m.start_credentials()
    h = await m.start_state()
    try:
        await h.new_thread(m.alpha, thread_id="t")
        await m.credentials.running.stop(0)
        details = await expect_error(grpc.StatusCode.UNAVAILABLE, h.append("t", SECRET, tenant=m.alpha))
        assert details["reason"] == "DATA_KEY_UNAVAILABLE" and details["retry_after"] == 1.0
        assert (await h.raw("SELECT count(*) FROM state_events"))[0][0] == 0
    finally:
        await m.stop()

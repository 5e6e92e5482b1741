"""Wiring of the state service: database, envelope encryption, servicer, server; and main()."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field

import grpc

from bulkhead.state.v1 import state_pb2, state_pb2_grpc
from services.state.config import StateConfig
from services.state.context_kv import ContextStore
from services.state.datakeys import DataKeyProvider, LocalDataKeyProvider
from services.state.envelope import Envelope, PlaintextEnvelope
from services.state.lifecycle import ForgetDataKeys
from services.state.peers import CredentialsDataKeyProvider
from services.state.records import Limits
from services.state.servicer import StateServicer
from services.state.store import DataKeyStore, StateBase
from services.state.threads import ThreadLog
from shared.client import make_channel
from shared.db import Database
from shared.lifecycle import lifecycle_binding
from shared.placement import open_service_database
from shared.security_events import SECURITY_EVENTS_METADATA, security_events_binding
from shared.server import Binding, RunningServer, serve
from shared.settings import load_page_key
from shared.tokens import TokenVerifier

MIGRATIONS = pathlib.Path(__file__).resolve().parent / "migrations"
"""The state service's Alembic migrations."""


def make_envelope(
    db: Database, provider: DataKeyProvider | None, *, cache_ttl: float = 300.0
) -> Envelope | PlaintextEnvelope:
    """Envelope encryption with keys from `provider`; None means no encryption (never in production)."""
    if provider is None:
        return PlaintextEnvelope()
    return Envelope(provider, DataKeyStore(db), cache_ttl=cache_ttl)


async def serve_state(
    *,
    db: Database,
    envelope: Envelope | PlaintextEnvelope,
    verifier: TokenVerifier,
    limits: Limits | None = None,
    address: str = "127.0.0.1:0",
) -> RunningServer:
    """Start the state gRPC server over an open database (tests call this with port 0)."""
    limits = limits or Limits()
    servicer = StateServicer(ThreadLog(db, envelope, limits), ContextStore(db, envelope, limits), db)
    binding = Binding(
        state_pb2_grpc.add_StateServiceServicer_to_server,
        servicer,
        state_pb2.DESCRIPTOR.services_by_name["StateService"],
    )
    lifecycle = lifecycle_binding(
        "state", db, [StateBase.metadata, SECURITY_EVENTS_METADATA], hooks=[ForgetDataKeys(envelope)]
    )
    security = security_events_binding("state", db)
    return await serve(
        name="state",
        bindings=[binding, lifecycle, security],
        verifier=verifier,
        address=address,
        page_key=await load_page_key(db, "state"),
    )


@dataclass
class StateService:
    """A running state service and what it must close on the way out."""

    running: RunningServer
    db: Database
    envelope: Envelope | PlaintextEnvelope
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop serving, forget plain keys, close channels and the database."""
        await self.running.stop(grace)
        await self.close()

    async def close(self) -> None:
        """Forget plain keys, close channels and the database (after the server stopped)."""
        self.envelope.forget()
        for channel in self.channels:
            await channel.close()
        await self.db.close()


async def start(config: StateConfig, verifier: TokenVerifier, *, address: str | None = None) -> StateService:
    """Open the database (migrating it), choose the key provider from config, start serving."""
    db = await open_service_database(
        config.service,
        migrations=str(MIGRATIONS),  # every region's
        read_url=config.service.database_read_url,
    )
    channels: list[grpc.aio.Channel] = []
    provider: DataKeyProvider | None
    if config.encryption == "credentials":
        channel = make_channel(config.credentials_addr, forward=True)
        channels.append(channel)
        provider = CredentialsDataKeyProvider(channel)
    elif config.encryption == "local":
        provider = LocalDataKeyProvider.from_file(config.master_key_path)
    else:
        provider = None
    envelope = make_envelope(db, provider, cache_ttl=config.key_cache_seconds)
    running = await serve_state(
        db=db, envelope=envelope, verifier=verifier, limits=config.limits, address=address or config.service.address
    )
    return StateService(running, db, envelope, channels)


async def main() -> None:
    """Run the state service until SIGTERM/SIGINT."""
    from shared.service_main import run_service

    config = StateConfig.from_env()
    await run_service(config.service, lambda verifier: start(config, verifier))

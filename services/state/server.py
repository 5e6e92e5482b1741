"""Wiring of the state service: database, envelope encryption, servicer, server; and main()."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass

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
from shared.db import Database
from shared.lifecycle import lifecycle_binding
from shared.placement import open_service_database
from shared.scaffold import Service, Startup, run_service, serve_service
from shared.security_events import SECURITY_EVENTS_METADATA
from shared.server import Binding, RunningServer
from shared.tls import TlsConfig
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
    tls: TlsConfig | None = None,
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
    return await serve_service("state", db, binding, lifecycle, verifier=verifier, address=address, tls=tls)


@dataclass(kw_only=True)
class StateService(Service):
    """A running state service."""

    db: Database
    """Its database."""
    envelope: Envelope | PlaintextEnvelope
    """Envelope encryption (its plain keys are forgotten on stop)."""


async def start(config: StateConfig, verifier: TokenVerifier, *, address: str | None = None) -> StateService:
    """Open the database (migrating it), choose the key provider from config, start serving."""
    async with Startup(config.service.tls) as up:
        service = config.service  # every region's database, migrated:
        db = up.closing(await open_service_database(service, migrations=MIGRATIONS, read_url=service.database_read_url))
        provider: DataKeyProvider | None = None
        if config.encryption == "credentials":
            provider = CredentialsDataKeyProvider(up.channel(config.credentials_addr, forward=True))
        elif config.encryption == "local":
            provider = LocalDataKeyProvider.from_file(config.master_key_path)
        envelope = make_envelope(db, provider, cache_ttl=config.key_cache_seconds)
        up.callback(envelope.forget)
        running = await serve_state(
            db=db,
            envelope=envelope,
            verifier=verifier,
            limits=config.limits,
            address=address or config.service.address,
            tls=up.tls,
        )
        return StateService(running=up.serving(running), stack=up.stack, db=db, envelope=envelope)


async def main(env: Mapping[str, str] = os.environ) -> None:
    """Run the state service until SIGTERM/SIGINT."""
    config = StateConfig.from_env(env)
    await run_service(config.service, lambda up: start(config, up.remote_verifier(config.service)))

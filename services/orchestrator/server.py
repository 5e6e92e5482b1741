"""Wiring of the orchestrator: database, engine, dispatcher, clients of the other services; and main()."""

from __future__ import annotations

import os
import pathlib
import uuid
from dataclasses import dataclass, field

import grpc
import httpx

from bulkhead.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from services.orchestrator.config import OrchestratorConfig
from services.orchestrator.dispatcher import Dispatcher, DispatchSettings, StepFeed
from services.orchestrator.engine import Engine, Limits, Ports
from services.orchestrator.grants import GrantSealer, load_or_create_key
from services.orchestrator.http_tools import HttpToolRunner
from services.orchestrator.injection import SecretInjector
from services.orchestrator.lifecycle import CancelRuns
from services.orchestrator.operations import Delegator, Orchestrator
from services.orchestrator.peers import IdentityDelegator, InferenceModel, Peers, StateContext, StateStepLog
from services.orchestrator.ratelimit import RateLimiter
from services.orchestrator.servicer import OrchestratorServicer
from services.orchestrator.stats import RunStats
from services.orchestrator.store import OrchestratorBase, RunStore, TeamStore
from services.orchestrator.wakeups import QueueListener
from shared.client import make_channel
from shared.config_audit import ConfigAudit
from shared.db import Database
from shared.lifecycle import lifecycle_binding
from shared.placement import open_service_database
from shared.retention import RetentionSweeper, retention_sweeper, sweep_interval
from shared.security_events import SECURITY_EVENTS_METADATA, security_events_binding
from shared.server import Binding, RunningServer, serve
from shared.settings import load_page_key
from shared.tiers import IdentityTiers
from shared.tokens import TokenVerifier

MIGRATIONS = pathlib.Path(__file__).resolve().parent / "migrations"
"""The orchestrator's Alembic migrations."""


@dataclass
class OrchestratorService:
    """A running orchestrator and what it must close on the way out."""

    running: RunningServer
    db: Database
    dispatcher: Dispatcher
    http: httpx.AsyncClient
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    retention: RetentionSweeper | None = None
    """Prunes configuration audit events past each tenant's retention (shared.retention)."""
    listener: QueueListener | None = None
    """Wakes the dispatcher when another replica changes the queue (Postgres LISTEN/NOTIFY)."""

    @property
    def address(self) -> str:
        """host:port of the gRPC server."""
        return self.running.address

    async def stop(self, grace: float = 2.0) -> None:
        """Stop serving and dispatching (leases go back to the queue), then close everything."""
        await self.running.stop(grace)
        await self.close()

    async def close(self) -> None:
        """Stop dispatching and close clients and the database (after the server stopped)."""
        if self.listener is not None:
            await self.listener.stop()
        await self.dispatcher.stop()
        if self.retention is not None:
            await self.retention.stop()
        await self.http.aclose()
        for channel in self.channels:
            await channel.close()
        await self.db.close()


async def start(
    config: OrchestratorConfig,
    verifier: TokenVerifier,
    *,
    peers: Peers | None = None,
    address: str | None = None,
    delegator: Delegator | None = None,
    canary_key: bytes | None = None,
    poll_seconds: float = 1.0,
) -> OrchestratorService:
    """Open the database (migrating it), connect to the peers, start dispatching and serving."""
    svc = config.service
    peers = peers or Peers(
        identity=svc.peer("identity"),
        state=svc.peer("state"),
        inference=svc.peer("inference"),
        credentials=svc.peer("credentials"),
    )
    db = await open_service_database(svc, migrations=str(MIGRATIONS))  # every region's (data residency)
    state_ch = make_channel(peers.state, forward=True)
    inference_ch = make_channel(peers.inference, forward=True)
    credentials_ch = make_channel(peers.credentials, forward=True)
    identity_ch = make_channel(peers.identity, forward=True)
    channels = [state_ch, inference_ch, credentials_ch, identity_ch]
    http = httpx.AsyncClient(timeout=config.tool_timeout, follow_redirects=False, trust_env=False)
    tools = HttpToolRunner(client=http, limiter=RateLimiter(config.tool_rate, int(config.tool_rate * 4) or 1))
    ports = Ports(
        log=StateStepLog(state_ch),
        model=InferenceModel(inference_ch),
        context=StateContext(state_ch),
        secrets=SecretInjector(credentials_ch),
        http=tools,
    )
    engine = Engine(
        canary_key=canary_key or _canary_key(config), limits=Limits(max_steps_per_run=config.max_steps_per_run)
    )
    owner = f"orch-{uuid.uuid4().hex[:12]}"  # this replica: its leases, and the origin of its queue notices
    runs, feed = RunStore(db, origin=owner), StepFeed()
    sealer = GrantSealer(load_or_create_key(config.grant_key_path))
    dispatcher = Dispatcher(
        runs=runs,
        engine=engine,
        ports_for=lambda: ports,
        sealer=sealer,
        feed=feed,
        settings=DispatchSettings(
            runs_per_tenant=config.runs_per_tenant,
            max_concurrent=config.max_concurrent,
            lease_seconds=config.lease_seconds,
            poll_seconds=poll_seconds,
        ),
        suspended=verifier.tenant_suspended,
        owner=owner,
    )
    orchestrator = Orchestrator(
        teams=TeamStore(db),
        runs=runs,
        dispatcher=dispatcher,
        feed=feed,
        delegator=delegator or IdentityDelegator(identity_ch),
        sealer=sealer,
        delegation_ttl=config.delegation_ttl,
        watch_poll=poll_seconds,
    )
    audit = ConfigAudit("orchestrator", db, tiers=IdentityTiers(identity_ch))
    servicer = OrchestratorServicer(orchestrator, RunStats(db), audit=audit)
    binding = Binding(
        orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server,
        servicer,
        orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"],
    )
    lifecycle = lifecycle_binding(
        "orchestrator",
        db,
        [OrchestratorBase.metadata, audit.metadata, SECURITY_EVENTS_METADATA],
        hooks=[CancelRuns(db)],
    )
    security = security_events_binding("orchestrator", db)
    running = await serve(
        name="orchestrator",
        bindings=[binding, lifecycle, audit.binding(), security],
        verifier=verifier,
        address=address or svc.address,
        page_key=await load_page_key(db, "orchestrator"),
    )
    dispatcher.start()
    listener = QueueListener(db.engine, dispatcher.wake, origin=owner)
    listener.start()
    retention = retention_sweeper("orchestrator", svc, [audit.prune], identity=peers.identity)
    retention.start(interval=sweep_interval(svc.env))
    return OrchestratorService(running, db, dispatcher, http, channels, retention, listener)


def _canary_key(config: OrchestratorConfig) -> bytes:
    raw = config.service.env.get("BULKHEAD_ORCHESTRATOR_CANARY_KEY")
    return bytes.fromhex(raw) if raw else load_or_create_key(config.canary_key_path)


async def main() -> None:
    """Run the orchestrator until SIGTERM/SIGINT."""
    from shared.service_main import run_service

    config = OrchestratorConfig.from_env(os.environ)
    await run_service(config.service, lambda verifier: start(config, verifier))

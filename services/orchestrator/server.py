"""Wiring of the orchestrator: database, engine, dispatcher, clients of the other services; and main()."""

from __future__ import annotations

import os
import pathlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

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
from shared.config_audit import ConfigAudit
from shared.db import Database
from shared.lifecycle import lifecycle_binding
from shared.placement import open_service_database
from shared.retention import retention_sweeper, sweep_interval
from shared.scaffold import Service, Startup, run_service, serve_service
from shared.security_events import SECURITY_EVENTS_METADATA
from shared.server import Binding, RunningServer
from shared.tiers import IdentityTiers
from shared.tls import TlsConfig
from shared.tokens import TokenVerifier

MIGRATIONS = pathlib.Path(__file__).resolve().parent / "migrations"
"""The orchestrator's Alembic migrations."""


@dataclass(kw_only=True)
class OrchestratorService(Service):
    """A running orchestrator and the parts tests reach into."""

    db: Database
    """Its database."""
    dispatcher: Dispatcher
    """Runs queued runs (stopping it hands their leases back to the queue)."""
    listener: QueueListener
    """Wakes the dispatcher when another replica changes the queue (Postgres LISTEN/NOTIFY)."""


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
    async with Startup(svc.tls) as up:
        db = up.closing(  # every region's (data residency)
            await open_service_database(svc, migrations=MIGRATIONS)
        )
        state_ch = up.channel(peers.state, forward=True)
        identity_ch = up.channel(peers.identity, forward=True)
        http = HttpToolRunner(
            timeout=config.tool_timeout, limiter=RateLimiter(config.tool_rate, int(config.tool_rate * 4) or 1)
        )
        up.stack.push_async_callback(http.aclose)
        ports = Ports(
            log=StateStepLog(state_ch),
            model=InferenceModel(up.channel(peers.inference, forward=True)),
            context=StateContext(state_ch),
            secrets=SecretInjector(up.channel(peers.credentials, forward=True)),
            http=http,
        )
        engine = Engine(
            canary_key=canary_key or config.canary_key(), limits=Limits(max_steps_per_run=config.max_steps_per_run)
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
        running = await serve_orchestrator(
            orchestrator, db, audit, verifier=verifier, address=address or svc.address, tls=up.tls
        )
        up.serving(running)
        up.started(dispatcher)
        listener = up.started(QueueListener(db.engine, dispatcher.wake, origin=owner))
        retention = retention_sweeper("orchestrator", svc, [audit.prune], identity=peers.identity)
        up.started(retention, interval=sweep_interval(svc.env))
        return OrchestratorService(running=running, stack=up.stack, db=db, dispatcher=dispatcher, listener=listener)


async def serve_orchestrator(
    orchestrator: Orchestrator,
    db: Database,
    audit: ConfigAudit,
    *,
    verifier: TokenVerifier,
    address: str = "127.0.0.1:0",
    tls: TlsConfig | None = None,
) -> RunningServer:
    """The orchestrator's gRPC server over its operations (start() builds them; port 0 for tests)."""
    binding = Binding(
        orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server,
        OrchestratorServicer(orchestrator, RunStats(db), audit=audit),
        orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"],
    )
    lifecycle = lifecycle_binding(
        "orchestrator",
        db,
        [OrchestratorBase.metadata, audit.metadata, SECURITY_EVENTS_METADATA],
        hooks=[CancelRuns(db)],
    )
    return await serve_service(
        "orchestrator", db, binding, lifecycle, verifier=verifier, address=address, tls=tls, audit=audit
    )


async def main(env: Mapping[str, str] = os.environ) -> None:
    """Run the orchestrator until SIGTERM/SIGINT."""
    config = OrchestratorConfig.from_env(env)
    await run_service(config.service, lambda up: start(config, up.remote_verifier(config.service)))

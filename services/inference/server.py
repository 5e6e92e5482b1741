"""Wiring of the inference proxy: database, metering and credentials clients, provider, server; and main()."""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass

from bulkhead.inference.v1 import inference_pb2, inference_pb2_grpc
from services.inference.attempts import AttemptJournal
from services.inference.budget import BudgetLeases
from services.inference.config import InferenceConfig, load_or_create_salt
from services.inference.lifecycle import DeliverUsage
from services.inference.limits import RateLimiter
from services.inference.peers import CredentialsKeys, MeteringClient, NoTenantKeys, PlatformUsage, platform_usage
from services.inference.providers import OFFLINE, Provider, make_provider
from services.inference.proxy import InferenceProxy, KeySource
from services.inference.servicer import InferenceServicer
from services.inference.store import InferenceBase, PolicyStore, SqlAttempts, SqlOutbox
from services.inference.usage import UsageMeter
from services.inference.workers import replica_name
from shared.config_audit import ConfigAudit
from shared.db import Database
from shared.lifecycle import lifecycle_binding
from shared.logs import register_secret
from shared.periodic import Periodic
from shared.placement import open_service_database
from shared.retention import retention_sweeper, sweep_interval
from shared.scaffold import Service, Startup, run_service, serve_service
from shared.security_events import SECURITY_EVENTS_METADATA
from shared.server import Binding, RunningServer
from shared.tiers import IdentityTiers, TierLookup
from shared.tls import TlsConfig
from shared.tokens import TokenVerifier

MIGRATIONS = pathlib.Path(__file__).resolve().parent / "migrations"
"""The inference proxy's Alembic migrations."""

log = logging.getLogger("bulkhead.inference")


@dataclass(kw_only=True)
class InferenceService(Service):
    """A running inference proxy and the parts tests reach into (stopping it settles leases and usage)."""

    proxy: InferenceProxy
    """The proxy (its background calls finish on stop)."""
    budget: BudgetLeases
    """Budget leases from metering (returned on stop)."""
    meter: UsageMeter
    """Usage delivery to metering (flushed on stop; what cannot go waits in the outbox)."""
    outbox: SqlOutbox
    """Usage metering has not acknowledged yet."""
    db: Database
    """Its database."""
    provider: Provider
    """The upstream model provider."""
    journal: AttemptJournal
    """Upstream attempts, settled by whichever replica is alive."""


async def start(
    config: InferenceConfig,
    verifier: TokenVerifier,
    *,
    address: str | None = None,
    provider: Provider | None = None,
    db: Database | None = None,
    lease_maintenance: float = 1.0,
    tiers: TierLookup | None = None,
    platform: PlatformUsage | None = None,
) -> InferenceService:
    """Open the database (migrating it; or take `db`, closed on stop), connect to metering and credentials, serve.

    tiers answers operators' calls about another tenant (identity, over the operator's token, unless given).
    platform is metering with the proxy's own service key (from its key file, unless given).
    """
    svc = config.service
    async with Startup(svc.tls) as up:
        if db is None:
            db = await open_service_database(svc, migrations=MIGRATIONS)  # every region's
        up.closing(db)
        register_secret(config.anthropic_api_key)
        salt = config.user_id_salt or load_or_create_salt(svc.data_dir)  # never a public constant
        register_secret(salt)
        metering = MeteringClient(up.channel(svc.peer("metering"), forward=True))
        tiers = tiers or IdentityTiers(up.channel(svc.peer("identity"), forward=True))
        keys: KeySource = NoTenantKeys()
        if config.provider != OFFLINE:
            credentials = up.channel(svc.peer("credentials"), forward=True)
            keys = CredentialsKeys(credentials, secret_name=config.provider_key_secret)
        provider = provider or make_provider(config)
        if hasattr(provider, "close"):
            up.stack.push_async_callback(provider.close)
        outbox = SqlOutbox(db)
        platform = platform or platform_usage(svc, up)
        replica = config.replica_id or replica_name(address or svc.address)
        budget = up.closing(
            BudgetLeases(
                metering,
                slice_tokens=config.lease_tokens,
                idle_release=config.lease_idle_seconds,
                platform=platform,
                suspended=verifier.tenant_suspended,
            )
        )
        journal = up.closing(AttemptJournal(SqlAttempts(db), replica=replica, sweep_after=config.attempt_sweep_seconds))
        meter = UsageMeter(
            metering, outbox, flush_interval=config.usage_flush_seconds, platform=platform, on_durable=journal.delivered
        )
        # What a killed predecessor of this replica left goes to the outbox before the meter looks there.
        await journal.start()
        await meter.start()
        up.closing(meter)
        store = PolicyStore(db)
        proxy = up.closing(
            InferenceProxy(
                provider=provider,
                platform_key=config.anthropic_api_key,
                policies=store,
                platform_policy=config.platform_policy,
                limiter=RateLimiter(),
                quotas=metering,
                budget=budget,
                meter=meter,
                keys=keys,
                max_attempts=config.max_attempts,
                max_retry_wait=config.max_retry_wait,
                journal=journal,
                user_id_salt=salt,
            )
        )
        audit = ConfigAudit("inference", db, tiers=tiers)
        servicer = InferenceServicer(
            proxy, store, tiers=tiers, audit=audit, allow_http_endpoints=config.allow_http_endpoints
        )
        running = await serve_inference(
            servicer,
            db,
            audit,
            DeliverUsage(meter, outbox),
            verifier=verifier,
            address=address or svc.address,
            tls=up.tls,
            workers=config.workers,
        )
        up.serving(running)

        async def sweep() -> None:
            meter.adopt_backlog(await journal.sweep())

        up.started(Periodic("lease-maintenance", budget.maintain, interval=lease_maintenance, log=log))
        sweep_every = min(30.0, max(0.2, config.attempt_sweep_seconds / 4))
        up.started(Periodic("attempt-sweeper", sweep, interval=sweep_every, log=log))
        retention = retention_sweeper("inference", svc, [audit.prune])  # configuration audit events
        up.started(retention, interval=sweep_interval(svc.env))
        return InferenceService(
            running=running,
            stack=up.stack,
            proxy=proxy,
            budget=budget,
            meter=meter,
            outbox=outbox,
            db=db,
            provider=provider,
            journal=journal,
        )


async def serve_inference(
    servicer: InferenceServicer,
    db: Database,
    audit: ConfigAudit,
    usage: DeliverUsage,
    *,
    verifier: TokenVerifier,
    address: str = "127.0.0.1:0",
    tls: TlsConfig | None = None,
    workers: int = 1,
) -> RunningServer:
    """The proxy's gRPC server over its servicer (start() builds it; port 0 for tests)."""
    binding = Binding(
        inference_pb2_grpc.add_InferenceServiceServicer_to_server,
        servicer,
        inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
    )
    lifecycle = lifecycle_binding(
        "inference", db, [InferenceBase.metadata, audit.metadata, SECURITY_EVENTS_METADATA], hooks=[usage]
    )
    # Worker processes share one port (SO_REUSEPORT: the kernel spreads connections over them); a lone
    # process keeps gRPC's default of refusing a port another process holds.
    options = (("grpc.so_reuseport", 1),) if workers > 1 else ()
    return await serve_service(
        "inference", db, binding, lifecycle, verifier=verifier, address=address, tls=tls, audit=audit, options=options
    )


async def main(env: Mapping[str, str] = os.environ) -> None:
    """Run the inference proxy until SIGTERM/SIGINT."""
    config = InferenceConfig.from_env(env)
    await run_service(config.service, lambda up: start(config, up.remote_verifier(config.service)))

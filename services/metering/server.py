"""Wiring of the metering service: database, price cache, ledgers, sweeper, server; and main()."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry

from bulkhead.metering.v1 import metering_pb2, metering_pb2_grpc
from services.metering import periods
from services.metering.budgets import BudgetLedger, budget_spec_cache
from services.metering.config import MeteringConfig
from services.metering.ledger import UsageLedger
from services.metering.lifecycle import KEPT
from services.metering.meters import MeteringMetrics
from services.metering.prices import PriceCache
from services.metering.retention import UsageDetailRetention
from services.metering.servicer import MeteringServicer, MeteringTiers
from services.metering.store import MeteringBase
from services.metering.sweeper import ExpirySweeper
from shared.config_audit import ConfigAudit
from shared.db import Database
from shared.lifecycle import lifecycle_binding
from shared.placement import open_service_database
from shared.retention import Prune, RetentionSweeper, retention_sweeper
from shared.retention import sweep_interval as retention_interval
from shared.scaffold import Service, Startup, run_service, serve_service
from shared.security_events import SECURITY_EVENTS_METADATA
from shared.server import Binding
from shared.tiers import IdentityTiers, TierLookup
from shared.tls import TlsConfig
from shared.tokens import TokenVerifier

MIGRATIONS = pathlib.Path(__file__).resolve().parent / "migrations"
"""The metering service's Alembic migrations."""


@dataclass(kw_only=True)
class MeteringService(Service):
    """A running metering service and the parts tests reach into."""

    db: Database
    """Its database."""
    usage: UsageLedger
    """Usage recording and reports."""
    budgets: BudgetLedger
    """Quotas, reservations and leases."""
    metrics: MeteringMetrics
    """Its Prometheus counters."""
    sweeper: ExpirySweeper
    """The expiry sweeper (tests call run_once())."""
    audit: ConfigAudit
    """Its configuration audit."""
    usage_retention: UsageDetailRetention
    """Prunes per-event usage detail past each tenant's retention (the roll-up stays)."""
    retention: RetentionSweeper | None = None
    """Prunes audit events and usage detail past each tenant's retention (shared.retention); started by start()."""

    def retention_steps(self) -> list[Prune]:
        """What retention prunes here: configuration audit events and per-event usage detail."""
        return [self.audit.prune, self.usage_retention.prune]


async def serve_metering(
    *,
    db: Database,
    verifier: TokenVerifier,
    address: str = "127.0.0.1:0",
    clock: Callable[[], int] = periods.now_us,
    registry: CollectorRegistry | None = None,
    sweep_interval: float | None = None,
    price_cache_s: float = 2.0,
    budget_cache_s: float = 2.0,
    tiers: TierLookup | None = None,
    tls: TlsConfig | None = None,
    startup: Startup | None = None,
    reuse_port: bool = False,
) -> MeteringService:
    """Start the metering server over an open database, which stopping it closes (tests: port 0, a fake clock,
    a fresh registry); start() passes its own startup, where it registered the database.

    sweep_interval=None leaves the background sweeper stopped (tests drive it with run_once()).
    tiers answers operators' quota calls about tenants metering has not seen yet (identity, in production).
    reuse_port: share the port with the other worker processes (SO_REUSEPORT: the kernel spreads connections
    over them); a lone process keeps gRPC's default of refusing a port another process holds.
    """
    async with startup or Startup(tls, owns=[db]) as up:
        metrics = MeteringMetrics(registry if registry is not None else CollectorRegistry())
        prices = PriceCache(db, max_age_us=int(price_cache_s * periods.US_PER_SECOND), clock=clock)
        usage = UsageLedger(db, prices, metrics, clock=clock)
        specs = budget_spec_cache(budget_cache_s)
        budgets = BudgetLedger(db, prices, clock=clock, on_reject=metrics.rejected, specs=specs)
        sweeper = ExpirySweeper(usage, budgets, interval=sweep_interval or 15.0)
        up.stack.push_async_callback(sweeper.stop)
        audit = ConfigAudit("metering", db, tiers=MeteringTiers(usage, tiers))
        binding = Binding(
            metering_pb2_grpc.add_MeteringServiceServicer_to_server,
            MeteringServicer(usage, budgets, prices, tiers, db=db, audit=audit),
            metering_pb2.DESCRIPTOR.services_by_name["MeteringService"],
        )
        lifecycle = lifecycle_binding(
            "metering", db, [MeteringBase.metadata, audit.metadata, SECURITY_EVENTS_METADATA], keep=KEPT
        )
        running = await serve_service(
            "metering",
            db,
            binding,
            lifecycle,
            verifier=verifier,
            address=address,
            tls=up.tls,
            audit=audit,
            options=(("grpc.so_reuseport", 1),) if reuse_port else (),
        )
        if sweep_interval:
            sweeper.start()
        return MeteringService(
            running=up.serving(running),
            stack=up.stack,
            db=db,
            usage=usage,
            budgets=budgets,
            metrics=metrics,
            sweeper=sweeper,
            audit=audit,
            usage_retention=UsageDetailRetention(db, prices),
        )


async def start(config: MeteringConfig, verifier: TokenVerifier, *, address: str | None = None) -> MeteringService:
    """Open the database (migrating it) and start serving and sweeping."""
    async with Startup(config.service.tls) as up:
        service = config.service  # every region's database, migrated:
        db = up.closing(await open_service_database(service, migrations=MIGRATIONS, read_url=service.database_read_url))
        metering = await serve_metering(
            db=db,
            verifier=verifier,
            address=address or service.address,
            registry=REGISTRY,
            sweep_interval=config.sweep_interval_s or None,
            price_cache_s=config.price_cache_s,
            budget_cache_s=config.budget_cache_s,
            tiers=IdentityTiers(up.channel(service.peer("identity"), forward=True)),
            startup=up,
            reuse_port=config.workers > 1,
        )
        sweeper = retention_sweeper("metering", service, metering.retention_steps())
        metering.retention = up.started(sweeper, interval=retention_interval(service.env))
        return metering


async def main(env: Mapping[str, str] = os.environ) -> None:
    """Run the metering service until SIGTERM/SIGINT."""
    config = MeteringConfig.from_env(env)
    await run_service(config.service, lambda up: start(config, up.remote_verifier(config.service)))

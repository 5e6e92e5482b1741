"""Wiring of the metering service: database, price cache, ledgers, sweeper, server; and main()."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field

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
from shared.client import make_channel
from shared.config_audit import ConfigAudit
from shared.db import Database
from shared.lifecycle import lifecycle_binding
from shared.placement import open_service_database
from shared.retention import RetentionSweeper, retention_sweeper
from shared.retention import sweep_interval as retention_interval
from shared.security_events import SECURITY_EVENTS_METADATA, security_events_binding
from shared.server import Binding, RunningServer, serve
from shared.settings import load_page_key
from shared.tiers import IdentityTiers, TierLookup
from shared.tokens import TokenVerifier

MIGRATIONS = pathlib.Path(__file__).resolve().parent / "migrations"
"""The metering service's Alembic migrations."""


@dataclass
class MeteringService:
    """A running metering service and what it must close on the way out."""

    running: RunningServer
    """The gRPC server."""
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

    async def stop(self, grace: float = 5.0) -> None:
        """Stop serving, then close everything."""
        await self.running.stop(grace)
        await self.close()

    channels: list = field(default_factory=list)
    """Channels it opened to other services."""
    audit: ConfigAudit | None = None
    """Its configuration audit."""
    usage_retention: UsageDetailRetention | None = None
    """Prunes per-event usage detail past each tenant's retention (the roll-up stays)."""
    retention: RetentionSweeper | None = None
    """Prunes audit events and usage detail past each tenant's retention (shared.retention)."""

    def retention_steps(self) -> list:
        """What retention prunes here: configuration audit events and per-event usage detail."""
        if self.audit is None or self.usage_retention is None:
            raise RuntimeError("retention_steps() before the audit and the usage retention were built")
        return [self.audit.prune, self.usage_retention.prune]

    async def close(self) -> None:
        """Stop the sweeper, close the database and channels (after the server stopped)."""
        await self.sweeper.stop()
        if self.retention is not None:
            await self.retention.stop()
        await self.db.close()
        for channel in self.channels:
            await channel.close()


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
) -> MeteringService:
    """Start the metering server over an open database (tests: port 0, a fake clock, a fresh registry).

    sweep_interval=None leaves the background sweeper stopped (tests drive it with run_once()).
    tiers answers operators' quota calls about tenants metering has not seen yet (identity, in production).
    """
    metrics = MeteringMetrics(registry if registry is not None else CollectorRegistry())
    prices = PriceCache(db, max_age_us=int(price_cache_s * periods.US_PER_SECOND), clock=clock)
    usage = UsageLedger(db, prices, metrics, clock=clock)
    budgets = BudgetLedger(db, prices, clock=clock, on_reject=metrics.rejected, specs=budget_spec_cache(budget_cache_s))
    sweeper = ExpirySweeper(usage, budgets, interval=sweep_interval or 15.0)
    audit = ConfigAudit("metering", db, tiers=MeteringTiers(usage, tiers))
    binding = Binding(
        metering_pb2_grpc.add_MeteringServiceServicer_to_server,
        MeteringServicer(usage, budgets, prices, tiers, db=db, audit=audit),
        metering_pb2.DESCRIPTOR.services_by_name["MeteringService"],
    )
    lifecycle = lifecycle_binding(
        "metering", db, [MeteringBase.metadata, audit.metadata, SECURITY_EVENTS_METADATA], keep=KEPT
    )
    security = security_events_binding("metering", db)
    running = await serve(
        name="metering",
        bindings=[binding, lifecycle, audit.binding(), security],
        verifier=verifier,
        address=address,
        page_key=await load_page_key(db, "metering"),
    )
    if sweep_interval:
        sweeper.start()
    return MeteringService(
        running, db, usage, budgets, metrics, sweeper, audit=audit, usage_retention=UsageDetailRetention(db, prices)
    )


async def start(config: MeteringConfig, verifier: TokenVerifier, *, address: str | None = None) -> MeteringService:
    """Open the database (migrating it) and start serving and sweeping."""
    db = await open_service_database(
        config.service,
        migrations=str(MIGRATIONS),  # every region's
        read_url=config.service.database_read_url,
    )
    identity = make_channel(config.service.peer("identity"), forward=True)
    service = await serve_metering(
        db=db,
        verifier=verifier,
        address=address or config.service.address,
        registry=REGISTRY,
        sweep_interval=config.sweep_interval_s or None,
        price_cache_s=config.price_cache_s,
        budget_cache_s=config.budget_cache_s,
        tiers=IdentityTiers(identity),
    )
    service.channels.append(identity)
    service.retention = retention_sweeper("metering", config.service, service.retention_steps())
    service.retention.start(interval=retention_interval(config.service.env))
    return service


async def main() -> None:
    """Run the metering service until SIGTERM/SIGINT."""
    from shared.service_main import run_service

    config = MeteringConfig.from_env()
    await run_service(config.service, lambda verifier: start(config, verifier))

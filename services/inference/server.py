"""Wiring of the inference proxy: database, metering and credentials clients, provider, server; and main()."""

from __future__ import annotations

import asyncio
import gc
import logging
import pathlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc

from bulkhead.client import RefreshingToken
from bulkhead.inference.v1 import inference_pb2, inference_pb2_grpc
from services.inference.attempts import AttemptJournal
from services.inference.budget import BudgetLeases
from services.inference.config import InferenceConfig, load_or_create_salt
from services.inference.lifecycle import DeliverUsage
from services.inference.limits import RateLimiter
from services.inference.peers import (
    CredentialsKeys,
    MeteringClient,
    NoTenantKeys,
    PlatformUsage,
)
from services.inference.providers import (
    OFFLINE,
    AnthropicProvider,
    OfflineProvider,
    Provider,
)
from services.inference.proxy import InferenceProxy, KeySource
from services.inference.servicer import InferenceServicer
from services.inference.store import InferenceBase, PolicyStore, SqlAttempts, SqlOutbox
from services.inference.usage import UsageMeter
from services.inference.workers import replica_name as _replica_name
from shared.client import make_channel
from shared.config_audit import ConfigAudit
from shared.db import Database
from shared.lifecycle import lifecycle_binding
from shared.logs import register_secret
from shared.periodic import Periodic
from shared.placement import open_service_database
from shared.retention import RetentionSweeper, retention_sweeper, sweep_interval
from shared.security_events import SECURITY_EVENTS_METADATA, security_events_binding
from shared.server import Binding, RunningServer, serve
from shared.settings import load_page_key
from shared.tiers import IdentityTiers, TierLookup
from shared.tokens import TokenVerifier

MIGRATIONS = pathlib.Path(__file__).resolve().parent / "migrations"
"""The inference proxy's Alembic migrations."""

log = logging.getLogger("bulkhead.inference")


def make_provider(config: InferenceConfig) -> Provider:
    """The provider the config names."""
    if config.provider == OFFLINE:
        return OfflineProvider()
    return AnthropicProvider(
        base_url=config.anthropic_base_url,
        timeout=config.upstream_timeout,
        direct=config.upstream_transport == "direct",
        http="httpx" if config.upstream_transport == "sdk-httpx" else "aiohttp",
    )


@dataclass
class InferenceService:
    """A running inference proxy and what it must settle and close on the way out."""

    running: RunningServer
    proxy: InferenceProxy
    budget: BudgetLeases
    meter: UsageMeter
    outbox: SqlOutbox
    db: Database
    provider: Provider
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    tasks: list[Periodic | RetentionSweeper] = field(default_factory=list)
    journal: AttemptJournal | None = None

    async def stop(self, grace: float = 5.0) -> None:
        """Stop serving, then settle leases and usage and close everything."""
        await self.running.stop(grace)
        await self.close()

    async def close(self) -> None:
        """Finish background calls, return leases, flush usage (outbox if metering is down), close."""
        await self.proxy.close()
        for task in self.tasks:
            await task.stop()
        await self.meter.close()
        if self.journal is not None:
            await self.journal.close()
        await self.budget.close()
        if hasattr(self.provider, "close"):
            await self.provider.close()
        for channel in self.channels:
            await channel.close()
        await self.db.close()


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
    """Open the database (migrating it), connect to metering and credentials, start serving.

    tiers answers operators' calls about another tenant (identity, over the operator's token, unless given).
    platform is metering with the proxy's own service key (from its key file, unless given).
    """
    if db is None:
        db = await open_service_database(config.service, migrations=str(MIGRATIONS))  # every region's
    register_secret(config.anthropic_api_key)
    salt = config.user_id_salt or load_or_create_salt(config.service.data_dir)  # never a public constant
    register_secret(salt)
    metering_channel = make_channel(config.service.peer("metering"), forward=True)
    channels = [metering_channel]
    metering = MeteringClient(metering_channel)
    if tiers is None:
        identity_channel = make_channel(config.service.peer("identity"), forward=True)
        channels.append(identity_channel)
        tiers = IdentityTiers(identity_channel)
    keys: KeySource
    if config.provider == OFFLINE:
        keys = NoTenantKeys()
    else:
        credentials_channel = make_channel(config.service.peer("credentials"), forward=True)
        channels.append(credentials_channel)
        keys = CredentialsKeys(credentials_channel, secret_name=config.provider_key_secret)
    provider = provider or make_provider(config)
    outbox = SqlOutbox(db)
    platform = platform or _platform_usage(config, channels)
    replica = config.replica_id or _replica_name(address or config.service.address)
    journal = AttemptJournal(SqlAttempts(db), replica=replica, sweep_after=config.attempt_sweep_seconds)
    meter = UsageMeter(
        metering, outbox, flush_interval=config.usage_flush_seconds, platform=platform, on_durable=journal.delivered
    )
    # What a killed predecessor of this replica left goes to the outbox before the meter looks there.
    await journal.start()
    await meter.start()
    budget = BudgetLeases(
        metering,
        slice_tokens=config.lease_tokens,
        idle_release=config.lease_idle_seconds,
        platform=platform,
        suspended=verifier.tenant_suspended,
    )
    store = PolicyStore(db)
    proxy = InferenceProxy(
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
    audit = ConfigAudit("inference", db, tiers=tiers)
    servicer = InferenceServicer(
        proxy, store, tiers=tiers, audit=audit, allow_http_endpoints=config.allow_http_endpoints
    )
    binding = Binding(
        inference_pb2_grpc.add_InferenceServiceServicer_to_server,
        servicer,
        inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
    )
    lifecycle = lifecycle_binding(
        "inference",
        db,
        [InferenceBase.metadata, audit.metadata, SECURITY_EVENTS_METADATA],
        hooks=[DeliverUsage(meter, outbox)],
    )
    security = security_events_binding("inference", db)
    # Worker processes share one port (SO_REUSEPORT: the kernel spreads connections over them); a lone
    # process keeps gRPC's default of refusing a port another process holds.
    options = (("grpc.so_reuseport", 1),) if config.workers > 1 else ()
    running = await serve(
        name="inference",
        bindings=[binding, lifecycle, audit.binding(), security],
        verifier=verifier,
        address=address or config.service.address,
        page_key=await load_page_key(db, "inference"),
        options=options,
    )

    async def sweep() -> None:
        meter.adopt_backlog(await journal.sweep())

    tasks: list[Periodic | RetentionSweeper]
    tasks = [
        Periodic("lease-maintenance", budget.maintain, interval=lease_maintenance, log=log),
        Periodic("attempt-sweeper", sweep, interval=min(30.0, max(0.2, config.attempt_sweep_seconds / 4)), log=log),
    ]
    for task in tasks:
        task.start()
    retention = retention_sweeper("inference", config.service, [audit.prune])  # configuration audit events
    retention.start(interval=sweep_interval(config.service.env))
    tasks.append(retention)  # stopped with the others
    return InferenceService(running, proxy, budget, meter, outbox, db, provider, channels, tasks, journal)


def _platform_usage(config: InferenceConfig, channels: list) -> PlatformUsage | None:
    """RecordTenantUsage with the proxy's own service key, when identity made one (see SERVICE_PRINCIPALS)."""
    path = config.service.service_key_file
    if path is None or not path.is_file():
        log.warning(
            "no service key at %s: usage held in the outbox reaches metering only when its tenant "
            "calls again (set BULKHEAD_INFERENCE_SERVICE_KEY_FILE)",
            path,
        )
        return None
    key = path.read_text().strip()
    register_secret(key)
    identity = make_channel(config.service.peer("identity"))
    platform = make_channel(config.service.peer("metering"), credentials=RefreshingToken(identity, key))
    channels.extend((identity, platform))
    return PlatformUsage(platform)


GC_THRESHOLDS = (20_000, 20, 20)
"""The cyclic collector's thresholds while serving. A young collection walks the container objects
alive at that moment (the calls in flight), whatever the threshold; with Python's default 700 it ran
every call or two, about 4% of the proxy's CPU at concurrency 32. A larger first threshold walks the
same live set 30 times less often (the garbage in between is freed by reference counting)."""


def freeze_startup_heap() -> None:
    """Exempt what start-up allocated (modules, descriptors) from the cyclic collector, and collect young
    objects less often (GC_THRESHOLDS).

    Those objects live as long as the process; without this every full collection walks them
    again, which showed as pauses in the tail latency under load.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run_loop(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run main() on uvloop when it is installed (about a fifth less CPU per proxied call than asyncio's
    own loop, measured with bench/proxy.py), else on asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


async def main() -> None:
    """Run the inference proxy until SIGTERM/SIGINT."""
    from shared.service_main import run_service

    config = InferenceConfig.from_env()

    async def start_frozen(verifier: TokenVerifier) -> InferenceService:
        service = await start(config, verifier)
        freeze_startup_heap()
        return service

    await run_service(config.service, start_frozen)

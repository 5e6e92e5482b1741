"""identity's wiring: database, signing keys, verifier over its own tables, the gRPC server."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bulkhead.identity.v1 import identity_pb2, identity_pb2_grpc
from services.identity.bootstrap import ensure_platform_tenant, ensure_service_keys
from services.identity.config import IdentityConfig
from services.identity.deletion import STEPS, Deletions
from services.identity.directory import Directory
from services.identity.issuance import Issuance
from services.identity.migration import Migrations
from services.identity.servicer import IdentityServicer
from services.identity.signing import SigningKeys, StoreKeyLoader, load_or_create_kek
from services.identity.store import IdentityBase
from shared.client import make_channel
from shared.config_audit import ConfigAudit, load_chain_key
from shared.db import Database
from shared.lifecycle import TenantLifecycle, lifecycle_binding
from shared.logs import setup_logging
from shared.metrics import serve_metrics
from shared.periodic import Periodic
from shared.retention import RetentionSweeper, sweep_interval
from shared.security_events import SECURITY_EVENTS_METADATA, security_events_binding
from shared.server import Binding, RunningServer, run_until_signalled, serve
from shared.settings import load_page_key
from shared.telemetry import setup_telemetry
from shared.tiers import Tier
from shared.tls import TlsConfig
from shared.tokens import RefreshingKeySource, TokenVerifier

MIGRATIONS = Path(__file__).parent / "migrations"
KEPT: dict[str, str] = {}
"""identity's tenant rows a deletion keeps: none. What stays is platform records about the tenant:
its tombstone in `tenants` and the deletion plan with its receipt (DeletionRow, DeletionStepRow),
whose target_tenant column is not a tenant_id (docs/CONTRACT.md, "What deletion keeps")."""
log = logging.getLogger("bulkhead.identity")


@dataclass
class IdentityApp:
    """A running identity service and what its tests reach into."""

    running: RunningServer
    db: Database
    keys: SigningKeys
    directory: Directory
    key_source: RefreshingKeySource
    operator_key: str | None
    """The operator key made by this start, or None when the platform tenant already existed."""
    service_keys_dir: Path | None = None
    """Where the platform services' key files are (see bootstrap.SERVICE_PRINCIPALS)."""
    deletions: Deletions | None = None
    """Tenant deletions (tests set deletions.peers once the other services listen)."""
    sweeper: Periodic | None = None
    """Runs due deletions and retries failed steps."""
    channels: dict = field(default_factory=dict)
    """Channels to the other services, by address."""
    retention: RetentionSweeper | None = None
    """Prunes configuration audit events past each tenant's retention (shared.retention)."""
    migrations: Migrations | None = None
    """Live tier migrations (shares deletions.peers)."""
    migration_sweeper: Periodic | None = None
    """Resumes unfinished migrations and retries failed steps."""

    async def close(self, grace: float = 1.0) -> None:
        await self.running.stop(grace)
        await _close_rest(self)


async def start(config: IdentityConfig, *, address: str | None = None, announce=sys.stdout) -> IdentityApp:
    """Migrate, bootstrap and serve identity."""
    svc = config.service
    db = await Database.open(svc.database_url, owner_url=svc.database_owner_url, migrations=MIGRATIONS)
    keys = SigningKeys(db, load_or_create_kek(config.kek_path))
    await keys.active()
    directory = Directory(db, regions=svc.regions)
    operator_key = await ensure_platform_tenant(directory, svc.data_dir, announce=announce)
    await ensure_service_keys(directory, config.service_keys_dir)
    key_source = RefreshingKeySource(StoreKeyLoader(keys, db), revocation_poll=config.revocation_poll, min_refetch=0.0)
    verifier = TokenVerifier(key_source)
    # identity's own rows stay pooled whatever the tenant's tier (see directory.pooled).
    audit = ConfigAudit("identity", db, rows_tier=Tier.POOLED, key=load_chain_key("identity", svc.env))
    own = TenantLifecycle(
        "identity",
        db,
        [IdentityBase.metadata, audit.metadata, SECURITY_EVENTS_METADATA],
        keep=KEPT,
        rows_tier=Tier.POOLED,
    )
    channels: dict = {}
    deletions = Deletions(
        db,
        keys,
        own,
        peers={s: svc.peers[s] for s in STEPS if s in svc.peers},
        channel_for=lambda addr: channels.get(addr) or channels.setdefault(addr, make_channel(addr)),
        on_status_change=key_source.refresh_revocations,
        lease_seconds=config.deletion_lease,
    )
    servicer = IdentityServicer(db, directory, Issuance(db, keys, verifier), keys, key_source, deletions, audit=audit)
    servicer.migrations = Migrations(
        db,
        keys,
        peers=deletions.peers,
        channel_for=lambda addr: channels.get(addr) or channels.setdefault(addr, make_channel(addr)),
        lease_seconds=config.deletion_lease,
        regions=svc.regions,
    )
    lifecycle = lifecycle_binding(
        "identity",
        db,
        [IdentityBase.metadata, audit.metadata, SECURITY_EVENTS_METADATA],
        keep=KEPT,
        rows_tier=Tier.POOLED,
    )
    running = await serve(
        name="identity",
        verifier=verifier,
        address=address or svc.address,
        tls=TlsConfig.from_env(svc.env),
        bindings=[
            Binding(
                identity_pb2_grpc.add_IdentityServiceServicer_to_server,
                servicer,
                identity_pb2.DESCRIPTOR.services_by_name["IdentityService"],
            ),
            lifecycle,
            security_events_binding("identity", db),
            audit.binding(),
        ],
        page_key=await load_page_key(db, "identity"),
    )
    sweeper = Periodic(
        "tenant-deletions", deletions.run_due, interval=config.deletion_interval, log=log, run_first=True
    )
    sweeper.start()
    retention = RetentionSweeper("identity", directory.retention_policies, [audit.prune])
    retention.start(interval=sweep_interval(svc.env))
    migration_sweeper = Periodic(
        "tenant-migrations", servicer.migrations.run_due, interval=config.deletion_interval, log=log, run_first=True
    )
    migration_sweeper.start()
    return IdentityApp(
        running,
        db,
        keys,
        directory,
        key_source,
        operator_key,
        config.service_keys_dir,
        deletions,
        sweeper,
        channels,
        retention,
        servicer.migrations,
        migration_sweeper,
    )


async def main(env: Mapping[str, str] = os.environ) -> None:
    """Run identity until SIGTERM/SIGINT."""
    config = IdentityConfig.from_env(env)
    setup_logging("identity", config.service.log_level)
    setup_telemetry("identity", config.service.otlp_endpoint)
    serve_metrics(config.service.metrics_port)
    app = await start(config)
    await run_until_signalled(app.running, on_stop=lambda: _close_rest(app))


async def _close_rest(app: IdentityApp) -> None:
    if app.sweeper is not None:
        await app.sweeper.stop()
    if app.retention is not None:
        await app.retention.stop()
    if app.migration_sweeper is not None:
        await app.migration_sweeper.stop()
    if app.migrations is not None:
        await app.migrations.close()
    if app.deletions is not None:
        await app.deletions.close()
    for channel in app.channels.values():
        await channel.close()
    await app.key_source.close()
    await app.db.close()

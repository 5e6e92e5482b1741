"""identity's wiring: database, signing keys, verifier over its own tables, the gRPC server."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

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
from shared.config_audit import ConfigAudit, load_chain_key
from shared.db import Database
from shared.lifecycle import TenantLifecycle, lifecycle_binding
from shared.periodic import Periodic
from shared.retention import RetentionSweeper, sweep_interval
from shared.scaffold import Service, Startup, run_service, serve_service
from shared.security_events import SECURITY_EVENTS_METADATA
from shared.server import Binding, RunningServer
from shared.tiers import Tier
from shared.tls import TlsConfig
from shared.tokens import RefreshingKeySource, TokenVerifier

MIGRATIONS = Path(__file__).parent / "migrations"
KEPT: dict[str, str] = {}
"""identity's tenant rows a deletion keeps: none. What stays is platform records about the tenant:
its tombstone in `tenants` and the deletion plan with its receipt (DeletionRow, DeletionStepRow),
whose target_tenant column is not a tenant_id (docs/CONTRACT.md, "What deletion keeps")."""
log = logging.getLogger("bulkhead.identity")


@dataclass(kw_only=True)
class IdentityApp(Service):
    """A running identity service and the parts its tests reach into."""

    db: Database
    """Its database."""
    keys: SigningKeys
    """The signing keys it issues tokens with."""
    directory: Directory
    """Tenants, principals and keys."""
    key_source: RefreshingKeySource
    """Its own verifier's keys, revocations and suspensions (straight from its tables)."""
    operator_key: str | None
    """The operator key made by this start, or None when the platform tenant already existed."""
    service_keys_dir: Path
    """Where the platform services' key files are (see bootstrap.SERVICE_PRINCIPALS)."""
    deletions: Deletions
    """Tenant deletions (tests set deletions.peers once the other services listen)."""
    migrations: Migrations
    """Live tier migrations (shares deletions.peers)."""
    retention: RetentionSweeper
    """Prunes configuration audit events past each tenant's retention (shared.retention)."""


async def serve_identity(
    servicer: IdentityServicer,
    db: Database,
    audit: ConfigAudit,
    *,
    verifier: TokenVerifier,
    address: str = "127.0.0.1:0",
    tls: TlsConfig | None = None,
) -> RunningServer:
    """identity's gRPC server over its servicer (start() builds it; port 0 for tests)."""
    tables = [IdentityBase.metadata, audit.metadata, SECURITY_EVENTS_METADATA]
    binding = Binding(
        identity_pb2_grpc.add_IdentityServiceServicer_to_server,
        servicer,
        identity_pb2.DESCRIPTOR.services_by_name["IdentityService"],
    )
    lifecycle = lifecycle_binding("identity", db, tables, keep=KEPT, rows_tier=Tier.POOLED)
    return await serve_service(
        "identity", db, binding, lifecycle, verifier=verifier, address=address, tls=tls, audit=audit
    )


async def start(config: IdentityConfig, *, address: str | None = None, announce: IO[str] = sys.stdout) -> IdentityApp:
    """Migrate, bootstrap and serve identity (which verifies tokens with its own keys, not a peer's)."""
    svc = config.service
    async with Startup(svc.tls) as up:
        db = up.closing(await Database.open(svc.database_url, owner_url=svc.database_owner_url, migrations=MIGRATIONS))
        keys = SigningKeys(db, load_or_create_kek(config.kek_path))
        await keys.active()
        directory = Directory(db, regions=svc.regions)
        operator_key = await ensure_platform_tenant(directory, svc.data_dir, announce=announce)
        await ensure_service_keys(directory, config.service_keys_dir)
        key_source = up.closing(
            RefreshingKeySource(StoreKeyLoader(keys, db), revocation_poll=config.revocation_poll, min_refetch=0.0)
        )
        verifier = TokenVerifier(key_source)
        # identity's own rows stay pooled whatever the tenant's tier (see directory.pooled).
        audit = ConfigAudit("identity", db, rows_tier=Tier.POOLED, key=load_chain_key("identity", svc.env))
        tables = [IdentityBase.metadata, audit.metadata, SECURITY_EVENTS_METADATA]
        own = TenantLifecycle("identity", db, tables, keep=KEPT, rows_tier=Tier.POOLED)
        channel_for = up.channel_pool()
        deletions = up.closing(
            Deletions(
                db,
                keys,
                own,
                peers={s: svc.peers[s] for s in STEPS if s in svc.peers},
                channel_for=channel_for,
                on_status_change=key_source.refresh_revocations,
                lease_seconds=config.deletion_lease,
            )
        )
        migrations = up.closing(
            Migrations(
                db,
                keys,
                peers=deletions.peers,
                channel_for=channel_for,
                lease_seconds=config.deletion_lease,
                regions=svc.regions,
            )
        )
        servicer = IdentityServicer(
            db, directory, Issuance(db, keys, verifier), keys, key_source, deletions, audit=audit
        )
        servicer.migrations = migrations
        running = await serve_identity(
            servicer, db, audit, verifier=verifier, address=address or svc.address, tls=up.tls
        )
        up.serving(running)
        every = config.deletion_interval
        up.started(Periodic("tenant-deletions", deletions.run_due, interval=every, log=log, run_first=True))
        retention = up.started(
            RetentionSweeper("identity", directory.retention_policies, [audit.prune]), interval=sweep_interval(svc.env)
        )
        up.started(Periodic("tenant-migrations", migrations.run_due, interval=every, log=log, run_first=True))
        return IdentityApp(
            running=running,
            stack=up.stack,
            db=db,
            keys=keys,
            directory=directory,
            key_source=key_source,
            operator_key=operator_key,
            service_keys_dir=config.service_keys_dir,
            deletions=deletions,
            migrations=migrations,
            retention=retention,
        )


async def main(env: Mapping[str, str] = os.environ) -> None:
    """Run identity until SIGTERM/SIGINT."""
    config = IdentityConfig.from_env(env)
    await run_service(config.service, lambda up: start(config))

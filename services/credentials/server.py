"""Wiring of the credentials service: database, backend, managers, rotation task, server; and main()."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bulkhead.credentials.v1 import credentials_pb2, credentials_pb2_grpc
from services.credentials.audit import AuditLog
from services.credentials.config import Config
from services.credentials.key_manager import KeyManager
from services.credentials.local_backend import LocalBackend
from services.credentials.master_key import load_or_create_master_key
from services.credentials.purge import CredentialsShredder
from services.credentials.rotation import RotationScheduler, RotatorRegistry
from services.credentials.secret_manager import SecretManager
from services.credentials.servicer import CredentialsServicer
from services.credentials.store import CredentialsBase
from shared.db import Database
from shared.lifecycle import lifecycle_binding
from shared.placement import open_service_database
from shared.retention import RetentionSweeper, retention_sweeper, sweep_interval
from shared.scaffold import Service, Startup, run_service, serve_service
from shared.security_events import SECURITY_EVENTS_METADATA
from shared.server import Binding
from shared.tls import TlsConfig
from shared.tokens import TokenVerifier

if TYPE_CHECKING:  # the vault backend's modules (hvac, requests) load only when it is configured
    from services.credentials.regional import RegionalVault
    from services.credentials.vault_backend import VaultBackend

MIGRATIONS = pathlib.Path(__file__).resolve().parent / "migrations"
"""The credentials service's Alembic migrations."""


@dataclass(kw_only=True)
class CredentialsService(Service):
    """A running credentials service and the parts tests reach into."""

    db: Database
    """Its database."""
    backend: LocalBackend | VaultBackend | RegionalVault
    """Where secret values and keys live."""
    secrets: SecretManager
    """Secrets and their versions."""
    keys: KeyManager
    """Tenants' Transit keys."""
    audit: AuditLog
    """The access audit chain."""
    scheduler: RotationScheduler
    """The rotation task (tests drive it with run_once())."""
    retention: RetentionSweeper | None = None
    """Prunes access audit events past each tenant's retention (shared.retention); started by start()."""


def make_backend(config: Config, db: Database) -> LocalBackend | VaultBackend | RegionalVault:
    """The backend the configuration selects."""
    if config.backend == "vault":
        from services.credentials.regional import make_vault

        return make_vault(config, db)  # an OpenBao per region when there are several (data residency)
    return LocalBackend(db, load_or_create_master_key(config.master_key_path))


async def serve_credentials(
    *,
    db: Database,
    backend: LocalBackend | VaultBackend | RegionalVault,
    verifier: TokenVerifier,
    address: str = "127.0.0.1:0",
    grace_seconds: int = 86400,
    rotators: RotatorRegistry | None = None,
    rotation_interval: float | None = None,
    cache_seconds: float = 1.0,
    audit_key: bytes = b"",
    tls: TlsConfig | None = None,
    startup: Startup | None = None,
) -> CredentialsService:
    """Start the credentials server over an open database and backend, which stopping it closes (tests call this
    with port 0); start() passes its own startup, where it registered both.

    rotation_interval=None leaves the rotation task stopped (tests drive it with run_once()).
    """
    async with startup or Startup(tls, owns=[db, backend]) as up:
        audit = up.closing(AuditLog(db, audit_key))
        secrets = SecretManager(
            db,
            backend,
            audit,
            rotators or RotatorRegistry(),
            default_grace_seconds=grace_seconds,
            cache_seconds=cache_seconds,
            cache_values=isinstance(backend, LocalBackend),
        )
        keys = KeyManager(backend, audit)

        async def run_job(kind: str, name: str) -> object:
            return await (secrets.rotate(name) if kind == "rotate" else secrets.expire_versions(name))

        scheduler = RotationScheduler(db, run_job, interval=rotation_interval or 30.0)
        up.stack.push_async_callback(scheduler.stop)
        binding = Binding(
            credentials_pb2_grpc.add_CredentialsServiceServicer_to_server,
            CredentialsServicer(secrets, keys, audit),
            credentials_pb2.DESCRIPTOR.services_by_name["CredentialsService"],
        )
        movers = []
        if not isinstance(backend, LocalBackend):
            from services.credentials.vault_move import VaultMover

            movers.append(VaultMover(backend))
        lifecycle = lifecycle_binding(
            "credentials",
            db,
            [CredentialsBase.metadata, SECURITY_EVENTS_METADATA],
            hooks=[CredentialsShredder(db, backend)],
            movers=movers,
        )
        running = await serve_service(
            "credentials", db, binding, lifecycle, verifier=verifier, address=address, tls=up.tls
        )
        if rotation_interval is not None:
            scheduler.start()
        return CredentialsService(
            running=up.serving(running),
            stack=up.stack,
            db=db,
            backend=backend,
            secrets=secrets,
            keys=keys,
            audit=audit,
            scheduler=scheduler,
        )


async def start(config: Config, verifier: TokenVerifier, *, address: str | None = None) -> CredentialsService:
    """Open the database (migrating it), build the configured backend, start serving and rotating."""
    async with Startup(config.service.tls) as up:
        db = up.closing(await open_service_database(config.service, migrations=MIGRATIONS))  # every region's
        service = await serve_credentials(
            db=db,
            backend=up.closing(make_backend(config, db)),
            verifier=verifier,
            address=address or config.service.address,
            grace_seconds=config.grace_seconds,
            rotation_interval=config.rotation_interval,
            cache_seconds=config.cache_seconds,
            audit_key=load_or_create_master_key(config.audit_key_path),
            startup=up,
        )
        sweeper = retention_sweeper("credentials", config.service, [service.audit.prune])
        service.retention = up.started(sweeper, interval=sweep_interval(config.service.env))
        return service


async def main(env: Mapping[str, str] = os.environ) -> None:
    """Run the credentials service until SIGTERM/SIGINT."""
    config = Config.from_env(env)
    await run_service(
        config.service, lambda up: start(config, up.remote_verifier(config.service)), secrets=config.vault_tokens()
    )

"""Wiring of the credentials service: database, backend, managers, rotation task, server; and main()."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

from bulkhead.credentials.v1 import credentials_pb2, credentials_pb2_grpc
from services.credentials.audit import AuditLog
from services.credentials.config import Config
from services.credentials.key_manager import KeyManager
from services.credentials.local_backend import LocalBackend
from services.credentials.master_key import load_or_create_master_key
from services.credentials.purge import CredentialsShredder
from services.credentials.regional import RegionalVault, make_vault
from services.credentials.rotation import RotationScheduler, RotatorRegistry
from services.credentials.secret_manager import SecretManager
from services.credentials.servicer import CredentialsServicer
from services.credentials.store import CredentialsBase
from services.credentials.vault_backend import VaultBackend
from services.credentials.vault_move import VaultMover
from shared.db import Database
from shared.lifecycle import lifecycle_binding
from shared.placement import open_service_database
from shared.retention import RetentionSweeper, retention_sweeper, sweep_interval
from shared.security_events import SECURITY_EVENTS_METADATA, security_events_binding
from shared.server import Binding, RunningServer, serve
from shared.settings import load_page_key
from shared.tokens import TokenVerifier

MIGRATIONS = pathlib.Path(__file__).resolve().parent / "migrations"
"""The credentials service's Alembic migrations."""


@dataclass
class CredentialsService:
    """A running credentials service and what it must close on the way out."""

    running: RunningServer
    db: Database
    backend: LocalBackend | VaultBackend | RegionalVault
    secrets: SecretManager
    keys: KeyManager
    audit: AuditLog
    scheduler: RotationScheduler
    retention: RetentionSweeper | None = None
    """Prunes access audit events past each tenant's retention (shared.retention)."""

    async def stop(self, grace: float = 5.0) -> None:
        """Stop serving, then close everything."""
        await self.running.stop(grace)
        await self.close()

    async def close(self) -> None:
        """Stop rotation, close the backend and the database (after the server stopped)."""
        await self.scheduler.stop()
        if self.retention is not None:
            await self.retention.stop()
        await self.backend.close()
        await self.audit.close()
        await self.db.close()


def make_backend(config: Config, db: Database) -> LocalBackend | VaultBackend | RegionalVault:
    """The backend the configuration selects."""
    if config.backend == "vault":
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
) -> CredentialsService:
    """Start the credentials server over an open database and backend (tests call this with port 0).

    rotation_interval=None leaves the rotation task stopped (tests drive it with run_once()).
    """
    audit = AuditLog(db, audit_key)
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
    binding = Binding(
        credentials_pb2_grpc.add_CredentialsServiceServicer_to_server,
        CredentialsServicer(secrets, keys, audit),
        credentials_pb2.DESCRIPTOR.services_by_name["CredentialsService"],
    )
    lifecycle = lifecycle_binding(
        "credentials",
        db,
        [CredentialsBase.metadata, SECURITY_EVENTS_METADATA],
        hooks=[CredentialsShredder(db, backend)],
        movers=[] if isinstance(backend, LocalBackend) else [VaultMover(backend)],
    )
    security = security_events_binding("credentials", db)
    running = await serve(
        name="credentials",
        bindings=[binding, lifecycle, security],
        verifier=verifier,
        address=address,
        page_key=await load_page_key(db, "credentials"),
    )
    if rotation_interval is not None:
        scheduler.start()
    return CredentialsService(running, db, backend, secrets, keys, audit, scheduler)


async def start(config: Config, verifier: TokenVerifier, *, address: str | None = None) -> CredentialsService:
    """Open the database (migrating it), build the configured backend, start serving and rotating."""
    db = await open_service_database(config.service, migrations=str(MIGRATIONS))  # every region's
    service = await serve_credentials(
        db=db,
        backend=make_backend(config, db),
        verifier=verifier,
        address=address or config.service.address,
        grace_seconds=config.grace_seconds,
        rotation_interval=config.rotation_interval,
        cache_seconds=config.cache_seconds,
        audit_key=load_or_create_master_key(config.audit_key_path),
    )
    service.retention = retention_sweeper("credentials", config.service, [service.audit.prune])
    service.retention.start(interval=sweep_interval(config.service.env))
    return service


async def main() -> None:
    """Run the credentials service until SIGTERM/SIGINT."""
    from shared.service_main import run_service

    config = Config.from_env()
    await run_service(config.service, lambda verifier: start(config, verifier), secrets=config.vault_tokens())

"""identity's wiring: database, signing keys, verifier over its own tables, the gRPC server."""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bulkhead.identity.v1 import identity_pb2, identity_pb2_grpc
from services.identity.bootstrap import ensure_platform_tenant, ensure_service_keys
from services.identity.config import IdentityConfig
from services.identity.directory import Directory
from services.identity.issuance import Issuance
from services.identity.servicer import IdentityServicer
from services.identity.signing import SigningKeys, StoreKeyLoader, load_or_create_kek
from shared.db import Database
from shared.logs import setup_logging
from shared.metrics import serve_metrics
from shared.server import Binding, RunningServer, run_until_signalled, serve
from shared.telemetry import setup_telemetry
from shared.tls import TlsConfig
from shared.tokens import RefreshingKeySource, TokenVerifier

MIGRATIONS = Path(__file__).parent / "migrations"


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

    async def close(self, grace: float = 1.0) -> None:
        await self.running.stop(grace)
        await self.key_source.close()
        await self.db.close()


async def start(config: IdentityConfig, *, address: str | None = None, announce=sys.stdout) -> IdentityApp:
    """Migrate, bootstrap and serve identity."""
    svc = config.service
    db = await Database.open(svc.database_url, owner_url=svc.database_owner_url, migrations=MIGRATIONS)
    keys = SigningKeys(db, load_or_create_kek(config.kek_path))
    await keys.active()
    directory = Directory(db)
    operator_key = await ensure_platform_tenant(directory, svc.data_dir, announce=announce)
    await ensure_service_keys(directory, config.service_keys_dir)
    key_source = RefreshingKeySource(StoreKeyLoader(keys, db), revocation_poll=config.revocation_poll,
                                     min_refetch=0.0)
    verifier = TokenVerifier(key_source)
    servicer = IdentityServicer(db, directory, Issuance(db, keys, verifier), keys, key_source)
    running = await serve(
        name="identity", verifier=verifier, address=address or svc.address, tls=TlsConfig.from_env(svc.env),
        bindings=[Binding(identity_pb2_grpc.add_IdentityServiceServicer_to_server, servicer,
                          identity_pb2.DESCRIPTOR.services_by_name["IdentityService"])])
    return IdentityApp(running, db, keys, directory, key_source, operator_key, config.service_keys_dir)


async def main(env: Mapping[str, str] = os.environ) -> None:
    """Run identity until SIGTERM/SIGINT."""
    config = IdentityConfig.from_env(env)
    setup_logging("identity", config.service.log_level)
    setup_telemetry("identity", config.service.otlp_endpoint)
    serve_metrics(config.service.metrics_port)
    app = await start(config)
    await run_until_signalled(app.running, on_stop=lambda: _close_rest(app))


async def _close_rest(app: IdentityApp) -> None:
    await app.key_source.close()
    await app.db.close()

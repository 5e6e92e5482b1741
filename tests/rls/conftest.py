"""Fixtures for the RLS conformance audit: a service migrated the way it runs, in every tier."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from shared.db import Database, bridge_schema, silo_database
from shared.tenancy import TenantContext, tenant_scope
from testkit.postgres import APP_ROLE, PostgresServer

from .audit import Target

ROOT = Path(__file__).resolve().parents[2]
BRIDGE_TENANT, SILO_TENANT = "t_rls_bridge", "t_rls_silo"


def _on(dsn: str, database: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))


async def migrate_everywhere(
    postgres: PostgresServer, service: str, migrations: Path | None = None, *, name: str | None = None
) -> list[Target]:
    """Migrate `service` as the services do: its own database (public schema), then through the tenant
    router a bridge tenant's schema and a silo tenant's database. One Target per place."""
    urls = await postgres.create_database(name or f"rls_{service}")
    folder = migrations or ROOT / "services" / service / "migrations"
    # Database.open migrates as the owner and grants DML to the runtime role; route() provisions tiers.
    db = await Database.open(urls.app_url, owner_url=urls.owner_url, migrations=folder)
    try:
        for tenant, tier in ((BRIDGE_TENANT, "bridge"), (SILO_TENANT, "silo")):
            with tenant_scope(TenantContext(tenant_id=tenant, principal_id="p_rls", tier=tier)):
                await db.route()
    finally:
        await db.close()
    admin = _on(postgres.admin_dsn, urls.name)
    silo = silo_database(urls.name, SILO_TENANT)
    main = Target(service, f"{service}/pooled", "public", admin, urls.owner_dsn, urls.app_dsn, APP_ROLE)
    return [
        main,
        Target(
            service, f"{service}/bridge", bridge_schema(BRIDGE_TENANT), admin, urls.owner_dsn, urls.app_dsn, APP_ROLE
        ),
        Target(
            service,
            f"{service}/silo",
            "public",
            _on(postgres.admin_dsn, silo),
            _on(urls.owner_dsn, silo),
            _on(urls.app_dsn, silo),
            APP_ROLE,
        ),
    ]

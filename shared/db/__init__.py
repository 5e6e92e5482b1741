"""The async DB layer of the tenancy library (DESIGN §3): tenant-confined sessions, RLS, tiers.

db = await Database.open(url, migrations="services/state/migrations", owner_url=owner)
async with db.session() as s:          # needs a TenantContext; confined to that tenant
    s.add(Thread(...))
async with db.system_session() as s:   # platform tables only
    ...
"""

from __future__ import annotations

from shared.db import _plain_mako  # noqa: F401  # first: before Alembic loads Mako
from shared.db.base import NAMING_CONVENTION, Base, TenantOwned, is_tenant_owned
from shared.db.database import Database
from shared.db.engine import make_engine, normalize_url
from shared.db.migrations import run_env, upgrade
from shared.db.replica import LSN_HEADER, answer_with_lsn, lsn_from, reading_after, reads_after_caller
from shared.db.rls import enable_tenant_rls, grant_app_role
from shared.db.router import Route, TenantRouter, bridge_schema, silo_database
from shared.db.session import TenantIsolationError, TenantSession
from shared.tenancy import NoTenantContext

__all__ = [
    "LSN_HEADER",
    "NAMING_CONVENTION",
    "Base",
    "Database",
    "NoTenantContext",
    "Route",
    "TenantIsolationError",
    "TenantOwned",
    "TenantRouter",
    "TenantSession",
    "answer_with_lsn",
    "bridge_schema",
    "enable_tenant_rls",
    "grant_app_role",
    "is_tenant_owned",
    "lsn_from",
    "make_engine",
    "normalize_url",
    "reading_after",
    "reads_after_caller",
    "run_env",
    "silo_database",
    "upgrade",
]

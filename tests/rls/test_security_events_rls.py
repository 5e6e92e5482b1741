"""RLS conformance of the security-events ledger, which every service keeps in its main database beside its own
tables (its own migration set, run when the server starts)."""

from __future__ import annotations

import asyncpg
import pytest

from shared.db import Database
from shared.security_events import TABLE, SecurityLedger

from .audit import audit
from .conftest import migrate_everywhere
from .test_conformance import CROSS_TENANT_TABLES, PLATFORM_TABLES

pytestmark = pytest.mark.postgres


async def test_the_ledger_beside_a_services_tables_conforms(postgres) -> None:
    """Migrated into state's main database as the service does: ENABLE + FORCE RLS, every policy on app.tenant_id
    (the retention sweep's too), the runtime role reads no row without its tenant and may not TRUNCATE."""
    main, *_ = await migrate_everywhere(postgres, "state", name="rls_security_events")
    db = await Database.open(
        main.app_dsn.replace("postgresql://", "postgresql+asyncpg://"),
        owner_url=main.owner_dsn.replace("postgresql://", "postgresql+asyncpg://"),
    )
    try:
        await SecurityLedger("state", db).migrate()
        await SecurityLedger("state", db).migrate()  # a second replica starting: nothing to do, no error
    finally:
        await db.close()
    platform = {**PLATFORM_TABLES["state"], "alembic_version_security_events": "Alembic's migration revision"}
    problems = await audit(main, platform=platform, cross_tenant=CROSS_TENANT_TABLES.get("state", {}))
    assert not problems, "\n".join(problems)
    conn = await asyncpg.connect(main.admin_dsn)
    try:
        policies = {
            r["polname"] for r in await conn.fetch("SELECT polname FROM pg_policy WHERE polrelid = $1::regclass", TABLE)
        }
        granted = await conn.fetchval("SELECT has_table_privilege($1, $2, 'INSERT')", main.app_role, TABLE)
    finally:
        await conn.close()
    assert policies == {"tenant_isolation", "retention_sweep", "retention_sweep_read"} and granted

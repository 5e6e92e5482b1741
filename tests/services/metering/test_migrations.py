"""The Alembic migrations build exactly the tables the models describe."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData

from services.metering.store import MeteringBase
from shared.config_audit import build_metadata
from shared.db import Database


async def test_migrations_match_the_models(migrated_sqlite):
    """Autogenerate finds nothing to change after the migrations ran (the version table aside)."""
    db = await Database.open(f"sqlite+aiosqlite:///{migrated_sqlite}")
    models = MetaData()  # the service's own tables and the configuration audit's (shared.config_audit)
    for metadata in (MeteringBase.metadata, build_metadata("metering")):
        for table in metadata.tables.values():
            table.to_metadata(models)
    try:
        async with db.engine.connect() as conn:
            diff = await conn.run_sync(lambda sync: compare_metadata(MigrationContext.configure(sync), models))
    finally:
        await db.close()
    assert [d for d in diff if not (d[0] == "remove_table" and d[1].name.startswith("alembic_version"))] == []

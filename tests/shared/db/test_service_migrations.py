"""Each service's Alembic migrations build exactly the tables, keys and indexes its models declare, on
SQLite and on Postgres: a migration that forgets an index its model names (or keeps one the model
dropped) fails here, by service."""

from __future__ import annotations

import importlib
import uuid
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData

from shared import config_audit
from shared.config import SERVICES
from shared.config_audit import build_metadata
from shared.db import Base, Database
from shared.db.migrations import version_table_for


def _models(service: str) -> tuple[MetaData, Path]:
    """The service's tables as its code declares them (its Base subclass's models, and the configuration
    audit chain's tables where it keeps one) and its migrations folder."""
    store = importlib.import_module(f"services.{service}.store")
    migrations = Path(importlib.import_module(f"services.{service}.server").MIGRATIONS)
    (root,) = {cls for cls in Base.__subclasses__() if cls.__module__ == store.__name__}
    models = MetaData()
    for metadata in (root.metadata, *([build_metadata(service)] if service in config_audit.SERVED_BY else [])):
        for table in metadata.tables.values():
            table.to_metadata(models)
    return models, migrations


async def _diff(db: Database, metadata: MetaData, migrations: Path) -> list:
    """What autogenerate would change; tables the service's code does not declare (its version table, the
    shared settings and security-event tables, which have migrations of their own) are left out."""

    def run(connection) -> list:
        context = MigrationContext.configure(connection, opts={"version_table": version_table_for(migrations)})
        return [d for d in compare_metadata(context, metadata) if d[0] != "remove_table"]

    async with db.engine.connect() as conn:
        return await conn.run_sync(run)


@pytest.mark.parametrize("service", SERVICES)
async def test_migrated_sqlite_matches_the_models(service: str, tmp_path: Path) -> None:
    metadata, migrations = _models(service)
    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", migrations=str(migrations))
    try:
        assert await _diff(db, metadata, migrations) == []
    finally:
        await db.close()


@pytest.mark.postgres
@pytest.mark.parametrize("service", SERVICES)
async def test_migrated_postgres_matches_the_models(service: str, postgres) -> None:
    metadata, migrations = _models(service)
    name = f"migrations_{service}_{uuid.uuid4().hex[:6]}"
    urls = await postgres.create_database(name)
    db = await Database.open(urls.app_url, migrations=str(migrations), owner_url=urls.owner_url)
    try:
        assert await _diff(db, metadata, migrations) == []
    finally:
        await db.close()
        await postgres.drop_database(name)

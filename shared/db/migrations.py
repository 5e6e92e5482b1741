"""Alembic, the Bulkhead way: one migration set per service, run on the async engine.

A service's migrations/env.py is just::

    from services.credentials.store import CredentialsBase
    from shared.db.migrations import run_env

    run_env(CredentialsBase.metadata)

Each service keeps its own version table (`alembic_version_<service>`), so services could share
one database. `upgrade()` runs a migration set to head; Database.open calls it in a worker
thread, and the tenant router calls it for every bridge schema and silo database.
"""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path
from typing import Any

from alembic import command, context
from alembic.config import Config
from sqlalchemy import URL, MetaData, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from shared.db.engine import normalize_url
from shared.db.rls import grant_to, quote_ident

_SCHEMA = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# alembic.context is a module-global proxy: two upgrades at once in one process would clobber it.
_ALEMBIC_LOCK = threading.Lock()


def version_table_for(migrations_dir: str | Path) -> str:
    """The per-service version table: `alembic_version_<folder that holds migrations/>`."""
    service = Path(migrations_dir).resolve().parent.name
    return "alembic_version_" + re.sub(r"[^a-z0-9_]", "_", service.lower())


def upgrade(
    url: str | URL,
    migrations_dir: str | Path,
    schema: str | None = None,
    *,
    app_role: str | None = None,
    revision: str = "head",
) -> None:
    """Run the migrations in `migrations_dir` against `url` up to `revision` (blocking).

    `schema` (Postgres) migrates into that schema, creating it first: the bridge tier.
    `app_role` (Postgres) is granted DML on every table afterwards, except the version table.
    It blocks: from async code prefer `await asyncio.to_thread(upgrade, ...)`.
    """
    if schema is not None and not _SCHEMA.match(schema):
        raise ValueError(f"schema name {schema!r}: use lower-case letters, digits and _")
    directory = Path(migrations_dir)
    if not (directory / "env.py").is_file():
        raise FileNotFoundError(f"no Alembic env.py in {directory}")
    config = Config()
    config.set_main_option("script_location", str(directory))
    # attributes, not main options: ini interpolation would mangle '%' in passwords.
    config.attributes.update(
        url=normalize_url(url), schema=schema, app_role=app_role, version_table=version_table_for(directory)
    )
    with _ALEMBIC_LOCK:
        command.upgrade(config, revision)


def run_env(target_metadata: MetaData | None, *, version_table: str | None = None) -> None:
    """The whole body of a service's migrations/env.py."""
    config = context.config
    table = (
        version_table
        or config.attributes.get("version_table")
        or version_table_for(config.get_main_option("script_location") or ".")
    )
    if context.is_offline_mode():
        context.configure(url=_url_of(config), target_metadata=target_metadata, version_table=table, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    _run_blocking(_run_online(config, target_metadata, table))


def _run_blocking(coro: Any) -> None:
    """asyncio.run, also from a thread whose loop is running (then on a helper thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coro)
        return
    failure: list[BaseException] = []

    def target() -> None:
        """Run the coroutine on this helper thread's own loop."""
        try:
            asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(exc)

    helper = threading.Thread(target=target, name="alembic-upgrade")
    helper.start()
    helper.join()
    if failure:
        raise failure[0]


def _url_of(config: Config) -> URL:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: call shared.db.migrations.upgrade() or set sqlalchemy.url")
    return normalize_url(url)


async def _run_online(config: Config, metadata: MetaData | None, version_table: str) -> None:
    engine = create_async_engine(_url_of(config), poolclass=NullPool)
    try:
        # One transaction for everything (Postgres DDL is transactional): all or nothing.
        async with engine.begin() as connection:
            await connection.run_sync(_migrate, config, metadata, version_table)
    finally:
        await engine.dispose()


def _migrate(connection: Connection, config: Config, metadata: MetaData | None, version_table: str) -> None:
    schema: str | None = config.attributes.get("schema")
    postgres = connection.dialect.name == "postgresql"
    options: dict[str, Any] = {}
    if postgres:
        # Two replicas starting together must not both run the same migration.
        connection.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"{schema or ''}.{version_table}"}
        )
        if schema:
            connection.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
            connection.execute(text("SELECT set_config('search_path', :schema, true)"), {"schema": schema})
            options["version_table_schema"] = schema
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=version_table,
        render_as_batch=not postgres,
        **options,
    )
    with context.begin_transaction():
        context.run_migrations()
    app_role = config.attributes.get("app_role")
    if postgres and app_role:
        grant_to(connection, app_role, exclude=(version_table,))

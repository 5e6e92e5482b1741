"""deploy/postgres/init-databases.sh on a real Postgres: the roles and databases compose and the
dev overlay rely on let every service migrate and run, with row level security in force."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import urllib.parse

import asyncpg
import pytest

from shared.config import SERVICES
from shared.db import Database
from testkit.postgres import find_bindir
from tests.deploy.k8s_helpers import DEPLOY, ROOT

pytestmark = pytest.mark.postgres

OWNER_PW, APP_PW = "owner-test-pw", "app-test-pw"


def _dsn(server, user: str, password: str, db: str) -> str:
    q = urllib.parse.quote
    return f"postgresql://{q(user, safe='')}:{q(password, safe='')}@{server.host}:{server.port}/{db}"


async def _drop_everything(server) -> None:
    conn = await asyncpg.connect(server.admin_dsn)
    try:
        for svc in SERVICES:
            for (name,) in await conn.fetch(
                "SELECT datname FROM pg_database WHERE datname LIKE $1", f"bulkhead_{svc}%"
            ):
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            for role in (f"bulkhead_{svc}_app", f"bulkhead_{svc}"):
                await conn.execute(f'DROP ROLE IF EXISTS "{role}"')
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def initialised(postgres):
    """The session's Postgres after init-databases.sh ran against it (cleaned up afterwards)."""
    bindir = find_bindir()
    psql = os.path.join(bindir, "psql") if bindir else shutil.which("psql")
    if not psql or not os.path.exists(psql):
        pytest.skip("psql not found")
    asyncio.run(_drop_everything(postgres))
    env = {
        **os.environ,
        "POSTGRES_USER": postgres.admin_user,
        "PGHOST": postgres.host,
        "PGPORT": str(postgres.port),
        "PGPASSWORD": postgres.admin_password,
        "BULKHEAD_PG_OWNER_PASSWORD": OWNER_PW,
        "BULKHEAD_PG_APP_PASSWORD": APP_PW,
        "PATH": f"{os.path.dirname(psql)}:{os.environ.get('PATH', '')}",
    }
    result = subprocess.run(
        ["sh", str(DEPLOY / "postgres" / "init-databases.sh")],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    yield postgres
    asyncio.run(_drop_everything(postgres))


async def test_every_service_migrates_as_owner_and_runs_as_app_role(initialised, monkeypatch) -> None:
    """Each service's migrations run as bulkhead_<svc>; its runtime role is neither superuser nor BYPASSRLS."""
    for svc in SERVICES:
        # As compose and the manifests set it: migrations that grant by name read it.
        monkeypatch.setenv("BULKHEAD_DB_APP_ROLE", f"bulkhead_{svc}_app")
        app = _dsn(initialised, f"bulkhead_{svc}_app", APP_PW, f"bulkhead_{svc}")
        owner = _dsn(initialised, f"bulkhead_{svc}", OWNER_PW, f"bulkhead_{svc}")
        db = await Database.open(app, owner_url=owner, migrations=ROOT / "services" / svc / "migrations")
        await db.close()
        conn = await asyncpg.connect(app)
        try:
            role = await conn.fetchrow("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user")
            assert (role["rolsuper"], role["rolbypassrls"]) == (False, False)
            owned = await conn.fetchval(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tableowner = current_user"
            )
            assert owned == 0  # the app role owns nothing, so FORCE'd row level security binds it
            tables = await conn.fetch(
                "SELECT tablename, rowsecurity FROM pg_tables WHERE schemaname = 'public' "
                "AND tablename <> 'alembic_version'"
            )
            assert tables, f"{svc}: no tables after migration"
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("CREATE TABLE sneaky (x int)")
        finally:
            await conn.close()


async def test_a_service_cannot_reach_another_services_database(initialised) -> None:
    """bulkhead_state_app may not even connect to credentials' database."""
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await asyncpg.connect(_dsn(initialised, "bulkhead_state_app", APP_PW, "bulkhead_credentials"))


async def test_owner_can_create_a_silo_database(initialised) -> None:
    """The owner role may CREATE DATABASE, which the tenant router needs for silo-tier tenants."""
    conn = await asyncpg.connect(_dsn(initialised, "bulkhead_state", OWNER_PW, "bulkhead_state"))
    try:
        await conn.execute('CREATE DATABASE "bulkhead_state_t_silo_probe"')
        await conn.execute('DROP DATABASE "bulkhead_state_t_silo_probe"')
    finally:
        await conn.close()

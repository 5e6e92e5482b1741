"""A throwaway PostgreSQL server for the test session.

Started once per session: in a container when a Docker engine answers (testcontainers), else
from the local binaries (`initdb` + `postgres` from /usr/lib/postgresql/<v>/bin) on a free
loopback port in a temp dir, running as an unprivileged account when we are root. Durability is
switched off (fsync, synchronous_commit) because the cluster dies with the session.

Each test suite asks for its own database with `await server.create_database("identity")`: the
database is owned by its own LOGIN role (what migrations run as) and the cluster-wide runtime
role `bulkhead_app` (LOGIN, NOSUPERUSER, NOBYPASSRLS, owns nothing) may connect to it, so row
level security really applies to the service.

Environment knobs: BULKHEAD_TEST_POSTGRES=auto|local|docker picks the backend (auto by default);
BULKHEAD_TEST_PG_BINDIR=/path/to/bin picks the local binaries;
BULKHEAD_TEST_POSTGRES_URL=postgresql://superuser:pw@host:port/postgres uses a server you run;
BULKHEAD_TEST_PGBOUNCER=1 sends every database's runtime URL through PgBouncer (transaction
pooling, testkit.pgbouncer).
"""

from __future__ import annotations

import asyncio
import functools
import glob
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from testkit.procs import (
    RunAs,
    ServerStartError,
    die_with_parent,
    free_port,
    make_workdir,
    stop_process,
    tail,
    unprivileged_account,
    wait_until,
)

APP_ROLE = "bulkhead_app"
ADMIN_ROLE = "bulkhead_admin"
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")
_INSTALL_HINT = (
    "PostgreSQL server binaries not found. Install them: "
    "`apt-get install -y postgresql` (Debian/Ubuntu), or run a Docker engine so "
    "testcontainers can start postgres:15, or point BULKHEAD_TEST_POSTGRES_URL "
    "at a server you run."
)


@dataclass(frozen=True)
class DatabaseUrls:
    """How to reach one test database, as its owner (migrations) and as the runtime role."""

    owner_url: str
    """SQLAlchemy URL (postgresql+asyncpg) for the database's owner role: run migrations with it."""
    app_url: str
    """SQLAlchemy URL for `bulkhead_app`: what the service uses at runtime (RLS applies).
    Through PgBouncer (postgresql+pgbouncer://) when the session runs with BULKHEAD_TEST_PGBOUNCER=1."""
    owner_dsn: str
    """Plain libpq DSN for the owner (asyncpg.connect)."""
    app_dsn: str
    """Plain libpq DSN for `bulkhead_app`, always straight to Postgres (tests' own inspection)."""
    name: str = ""
    """The database name (the requested one, with a suffix if it was already taken)."""
    owner_role: str = ""
    """The owner role's name."""


def _dsn(user: str, password: str, host: str, port: int, database: str) -> str:
    quote = urllib.parse.quote
    return f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/{database}"


def _sqlalchemy(dsn: str) -> str:
    return "postgresql+asyncpg://" + dsn.removeprefix("postgresql://")


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def find_bindir(env: Mapping[str, str] = os.environ) -> str | None:
    """The directory holding initdb/postgres: $BULKHEAD_TEST_PG_BINDIR, pg_config's bindir, else
    the newest /usr/lib/postgresql/<v>/bin."""
    if env.get("BULKHEAD_TEST_PG_BINDIR"):
        bindir = env["BULKHEAD_TEST_PG_BINDIR"]
        return bindir if os.path.exists(os.path.join(bindir, "initdb")) else None
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and os.path.exists(os.path.join(out, "initdb")):
            return out
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    candidates.sort(key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if candidates:
        return os.path.dirname(candidates[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def docker_engine_answers(timeout: float = 2.0) -> bool:
    """Whether a Docker engine answers a ping quickly (testcontainers needs one)."""
    try:
        import docker  # testcontainers depends on it
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - no socket, no permission, wrong context: all mean "no engine"
        return False


@dataclass
class PostgresServer:
    """A running throwaway PostgreSQL server reachable through a superuser."""

    host: str
    """Host to connect to (loopback for local clusters)."""
    port: int
    """TCP port."""
    admin_user: str
    """A superuser (creates databases and roles)."""
    admin_password: str = field(repr=False)
    """Its password."""
    backend: str
    """local, docker or external."""
    socket_dir: str | None = None
    """Directory of the unix socket (local clusters only)."""
    app_password: str = field(default_factory=lambda: secrets.token_urlsafe(18), repr=False)
    """Password of the cluster-wide runtime role `bulkhead_app`."""
    pooler: Any = None
    """A PgBouncer the runtime role's app_url goes through (BULKHEAD_TEST_PGBOUNCER=1), or None."""
    _stop: object = field(default=None, repr=False)
    _names: set[str] = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _app_role_ready: bool = field(default=False, repr=False)

    @property
    def admin_dsn(self) -> str:
        """libpq DSN of the superuser on the `postgres` database (asyncpg.connect)."""
        return _dsn(self.admin_user, self.admin_password, self.host, self.port, "postgres")

    @property
    def admin_url(self) -> str:
        """SQLAlchemy URL (postgresql+asyncpg) of the superuser on the `postgres` database."""
        return _sqlalchemy(self.admin_dsn)

    @property
    def app_role(self) -> str:
        """Name of the runtime role."""
        return APP_ROLE

    def _reserve(self, name: str) -> str:
        if not _IDENT.match(name):
            raise ValueError(f"database name {name!r}: use lower-case letters, digits and _ (max 40)")
        with self._lock:
            candidate, n = name, 1
            while candidate in self._names:
                n += 1
                candidate = f"{name}_{n}"
            self._names.add(candidate)
            return candidate

    async def create_database(self, name: str) -> DatabaseUrls:
        """Create a fresh database owned by its own role; `bulkhead_app` may connect to it.

        A name already handed out this session gets a suffix (`identity_2`), so suites never
        share a database by accident. The owner may CREATEDB (the tenant router makes silo
        databases with it) but is no superuser. Nothing is granted on tables: as in
        production, migrations grant DML to `bulkhead_app` and create the RLS policies, so a
        migration that forgets a grant fails its tests.
        """
        import asyncpg

        db = self._reserve(name)
        owner, owner_pw = f"{db}_owner", secrets.token_urlsafe(18)
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await self._ensure_app_role(conn)
            # A leftover from an earlier run against an external server must not leak in.
            await _drop(conn, db, owner)
            await conn.execute(
                f'CREATE ROLE "{owner}" LOGIN NOSUPERUSER NOBYPASSRLS CREATEDB PASSWORD {_quote_literal(owner_pw)}'
            )
            # DROP DATABASE ... WITH (FORCE) of a silo database ends other replicas' (app role) and autovacuum's
            # sessions in it: the owner must be allowed to signal them.
            await conn.execute(f'GRANT pg_signal_backend TO "{owner}"')
            # The superuser must be a member to CREATE DATABASE ... OWNER on managed servers.
            await conn.execute(f'GRANT "{owner}" TO CURRENT_USER')
            await conn.execute(f'CREATE DATABASE "{db}" OWNER "{owner}"')
            await conn.execute(f'REVOKE ALL ON DATABASE "{db}" FROM PUBLIC')
            await conn.execute(f'GRANT CONNECT, TEMPORARY ON DATABASE "{db}" TO "{APP_ROLE}"')
        finally:
            await conn.close()
        owner_dsn = _dsn(owner, owner_pw, self.host, self.port, db)
        app_dsn = _dsn(APP_ROLE, self.app_password, self.host, self.port, db)
        app_url = self.pooler.app_url(db) if self.pooler is not None else _sqlalchemy(app_dsn)
        return DatabaseUrls(
            owner_url=_sqlalchemy(owner_dsn),
            app_url=app_url,
            owner_dsn=owner_dsn,
            app_dsn=app_dsn,
            name=db,
            owner_role=owner,
        )

    def create_database_sync(self, name: str) -> DatabaseUrls:
        """create_database for sync code (sync fixtures): runs it on a private event loop."""
        return _run_in_thread(self.create_database(name))

    async def drop_database(self, name: str) -> None:
        """Drop a database made by create_database, the silo databases its owner made, and the owner."""
        import asyncpg

        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await _drop(conn, name, f"{name}_owner")
        finally:
            await conn.close()

    async def _ensure_app_role(self, conn) -> None:
        if self._app_role_ready:
            return
        pw = _quote_literal(self.app_password)
        exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", APP_ROLE)
        verb = "ALTER" if exists else "CREATE"
        await conn.execute(
            f'{verb} ROLE "{APP_ROLE}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS NOINHERIT PASSWORD {pw}'
        )
        self._app_role_ready = True

    def stop(self) -> None:
        """Stop the server now (immediate shutdown; the data is thrown away)."""
        stop, self._stop = self._stop, None
        if callable(stop):
            stop()


async def _drop(conn, database: str, owner: str) -> None:
    """Drop `database` and every database `owner` created (silo tenants), then `owner` itself."""
    owned = await conn.fetch(
        "SELECT d.datname FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba WHERE r.rolname = $1", owner
    )
    for name in {database, *(row["datname"] for row in owned)}:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name.replace(chr(34), chr(34) * 2)}" WITH (FORCE)')
    await conn.execute(f'DROP ROLE IF EXISTS "{owner}"')


def _run_in_thread(coro):
    """Run a coroutine to completion on a fresh loop in another thread (safe inside a running loop)."""
    result: dict = {}

    def _target() -> None:
        try:
            result["value"] = asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=_target, name="postgres-admin")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def start_postgres(env: Mapping[str, str] = os.environ) -> PostgresServer:
    """Start (or attach to) the session's PostgreSQL server, choosing the backend from env."""
    external = env.get("BULKHEAD_TEST_POSTGRES_URL")
    if external:
        return _external(external)
    mode = env.get("BULKHEAD_TEST_POSTGRES", "auto")
    if mode not in ("auto", "local", "docker"):
        raise ServerStartError(f"BULKHEAD_TEST_POSTGRES={mode!r}: use auto, local or docker")
    if mode == "docker" or (mode == "auto" and docker_engine_answers()):
        return _start_container()
    bindir = find_bindir(env)
    if bindir is None:
        raise ServerStartError(_INSTALL_HINT)
    return _start_local(bindir)


def _external(url: str) -> PostgresServer:
    parts = urllib.parse.urlsplit(url)
    return PostgresServer(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 5432,
        admin_user=urllib.parse.unquote(parts.username or "postgres"),
        admin_password=urllib.parse.unquote(parts.password or ""),
        backend="external",
    )


def _start_container() -> PostgresServer:
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError as exc:
        raise ServerStartError("testcontainers is not installed: pip install -e '.[test]'") from exc
    if not docker_engine_answers():
        raise ServerStartError("BULKHEAD_TEST_POSTGRES=docker but no Docker engine answers")
    password = secrets.token_urlsafe(18)
    container = PostgresContainer(
        "postgres:15-alpine", username=ADMIN_ROLE, password=password, dbname="postgres", driver=None
    ).with_command("postgres -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
    try:
        container.start()
    except Exception as exc:  # pull/run failures surface as many docker exception types
        raise ServerStartError(f"testcontainers could not start postgres:15: {exc}") from exc
    server = PostgresServer(
        host=container.get_container_host_ip(),
        port=int(container.get_exposed_port(5432)),
        admin_user=ADMIN_ROLE,
        admin_password=password,
        backend="docker",
    )
    server._stop = container.stop
    return server


_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "shared_buffers": "64MB",
    "log_min_messages": "warning",
    "log_min_error_statement": "panic",
    "logging_collector": "off",
}


def _start_local(bindir: str, attempts: int = 3) -> PostgresServer:
    account = unprivileged_account()
    # /tmp paths stay short: the unix socket path must fit in 107 bytes.
    root = make_workdir("bulkhead-pg-")
    try:
        os.chmod(root, 0o700)
        account.chown(root)
        password = secrets.token_urlsafe(18)
        _initdb(bindir, root, password, account)
        last: Exception | None = None
        for _ in range(attempts):
            port = free_port()
            try:
                proc = _launch(bindir, root, port, account)
            except ServerStartError as exc:  # most likely someone took the port: try another
                last = exc
                continue
            server = PostgresServer(
                host="127.0.0.1",
                port=port,
                admin_user=ADMIN_ROLE,
                admin_password=password,
                backend="local",
                socket_dir=root,
            )
            server._stop = functools.partial(_stop_local, proc, root)
            return server
        raise last or ServerStartError("postgres did not start")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def _stop_local(proc: subprocess.Popen, root: str) -> None:
    """Immediate shutdown (SIGQUIT, what `pg_ctl stop -m immediate` sends), then delete the data."""
    stop_process(proc, signal.SIGQUIT)
    shutil.rmtree(root, ignore_errors=True)


def _initdb(bindir: str, root: str, password: str, account: RunAs) -> None:
    pwfile = os.path.join(root, "pwfile")
    with open(pwfile, "w") as f:
        f.write(password + "\n")
    account.chown(pwfile)
    cmd = [
        os.path.join(bindir, "initdb"),
        "-D",
        os.path.join(root, "data"),
        "-U",
        ADMIN_ROLE,
        f"--pwfile={pwfile}",
        "--auth=scram-sha-256",
        "--encoding=UTF8",
        "--locale=C",
        "--no-sync",
        "--no-instructions",
    ]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120, **account.popen_kwargs())
    os.unlink(pwfile)
    if done.returncode != 0:
        raise ServerStartError(f"initdb failed (as {account.name}):\n{done.stdout}{done.stderr}")
    with open(os.path.join(root, "data", "postgresql.conf"), "a") as conf:
        conf.write("\n# bulkhead test cluster\n")
        for key, value in _SETTINGS.items():
            conf.write(f"{key} = {value}\n")
        conf.write(f"unix_socket_directories = '{root}'\n")


def _launch(bindir: str, root: str, port: int, account: RunAs) -> subprocess.Popen:
    """Run the postmaster as our child, so that it dies with us (SIGQUIT = immediate stop)."""
    log = os.path.join(root, f"postgres-{port}.log")
    with open(log, "w") as f:
        account.chown(log)
        proc = subprocess.Popen(
            [os.path.join(bindir, "postgres"), "-D", os.path.join(root, "data"), "-p", str(port)],
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(signal.SIGQUIT),
            start_new_session=True,
            **account.popen_kwargs(),
        )
    isready = os.path.join(bindir, "pg_isready")

    def ready() -> bool:
        return (
            subprocess.run(
                [isready, "-q", "-h", "127.0.0.1", "-p", str(port), "-t", "1"], capture_output=True
            ).returncode
            == 0
        )

    try:
        wait_until(ready, timeout=60, interval=0.1, what=f"postgres on port {port}", alive=lambda: proc.poll() is None)
    except ServerStartError as exc:
        stop_process(proc, signal.SIGQUIT)
        raise ServerStartError(f"{exc}\n{tail(log)}") from None
    return proc

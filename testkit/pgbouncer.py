"""A throwaway PgBouncer in TRANSACTION pooling mode in front of the session's PostgreSQL.

Every database of the server is reachable through it under its own name (a `*` fallback
entry), so silo databases the tenant router creates later are too. Clients authenticate with
SCRAM against a userlist holding the runtime role (and the superuser, for inspection); PgBouncer
logs in to Postgres with the same passwords. Owner roles are not listed: migrations go straight
to Postgres, as in production.

No reset query runs between transactions (`server_reset_query_always = 0`, the default): a
server connection reaches the next client with whatever the previous one left in the session,
so the tests see a session-level leak instead of having PgBouncer hide it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

from testkit.postgres import APP_ROLE, PostgresServer
from testkit.procs import (
    ServerStartError,
    die_with_parent,
    free_port,
    make_workdir,
    port_accepts,
    stop_process,
    tail,
    unprivileged_account,
    wait_until,
)

SCHEME = "postgresql+pgbouncer"
"""SQLAlchemy scheme of an engine behind a transaction pooler (see shared.db.engine)."""
_INSTALL_HINT = (
    "pgbouncer not found. Install it: `apt-get install -y --no-install-recommends pgbouncer` "
    "(Debian/Ubuntu; scripts/test does this), or set BULKHEAD_TEST_PGBOUNCER_BIN."
)


@dataclass
class PgBouncer:
    """A running PgBouncer (transaction pooling) in front of one PostgresServer."""

    host: str
    """Loopback address it listens on."""
    port: int
    """Its TCP port."""
    server: PostgresServer = field(repr=False)
    """The Postgres behind it."""
    version: str = ""
    """`pgbouncer --version`'s first line."""
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    _root: str = field(default="", repr=False)

    def dsn(self, user: str, password: str, database: str) -> str:
        """libpq DSN of `database` through PgBouncer (asyncpg.connect)."""
        quote = urllib.parse.quote
        return f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@{self.host}:{self.port}/{database}"

    def app_dsn(self, database: str) -> str:
        """libpq DSN of `database` as the runtime role, through PgBouncer."""
        return self.dsn(APP_ROLE, self.server.app_password, database)

    def app_url(self, database: str) -> str:
        """SQLAlchemy URL of `database` as the runtime role, through PgBouncer."""
        return SCHEME + "://" + self.app_dsn(database).removeprefix("postgresql://")

    def admin_dsn(self, database: str = "postgres") -> str:
        """libpq DSN of `database` as the superuser, through PgBouncer."""
        return self.dsn(self.server.admin_user, self.server.admin_password, database)

    async def add_user(self, user: str, password: str, database: str) -> None:
        """Let `user` (e.g. a database's owner role) log in through PgBouncer too, once it really can."""
        import asyncpg

        with open(os.path.join(self._root, "userlist.txt"), "a") as f:
            f.write(_userlist_line(user, password))
        if self._proc is not None:
            self._proc.send_signal(signal.SIGHUP)  # reloads the auth file, asynchronously
        deadline = time.monotonic() + 10
        while True:
            try:
                conn = await asyncpg.connect(self.dsn(user, password, database), statement_cache_size=0)
            except (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.ProtocolViolationError):
                # Not reloaded yet: PgBouncer answers an unknown user with "SASL authentication failed".
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
                continue
            await conn.close()
            return

    def stop(self) -> None:
        """Stop PgBouncer (SIGTERM: immediate shutdown) and delete its directory."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, signal.SIGTERM)
        if self._root:
            shutil.rmtree(self._root, ignore_errors=True)


def find_pgbouncer(env: Mapping[str, str] = os.environ) -> str | None:
    """The pgbouncer binary: $BULKHEAD_TEST_PGBOUNCER_BIN, else PATH, else /usr/sbin (Debian's place)."""
    if env.get("BULKHEAD_TEST_PGBOUNCER_BIN"):
        path = env["BULKHEAD_TEST_PGBOUNCER_BIN"]
        return path if os.access(path, os.X_OK) else None
    found = shutil.which("pgbouncer")
    if found:
        return found
    return "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None


def _userlist_line(user: str, password: str) -> str:
    return '"{}" "{}"\n'.format(user.replace('"', '""'), password.replace('"', '""'))


def _config(server: PostgresServer, root: str, port: int) -> str:
    # The fallback entry names no user: PgBouncer logs in to Postgres as the client's user with the
    # password from auth_file (SCRAM to both sides works because it holds plain text).
    return f"""[databases]
* = host={server.host} port={server.port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {root}/userlist.txt
pool_mode = transaction
; few server connections per (database, user): clients really share them
default_pool_size = 4
max_client_conn = 500
server_reset_query_always = 0
; a client stuck behind an exhausted pool fails in 30 s, saying so, rather than hanging the test run
query_wait_timeout = 30
log_connections = 0
log_disconnections = 0
"""


def start_pgbouncer(server: PostgresServer, env: Mapping[str, str] = os.environ, attempts: int = 3) -> PgBouncer:
    """Start PgBouncer in transaction mode on a free loopback port in front of `server`."""
    binary = find_pgbouncer(env)
    if binary is None:
        raise ServerStartError(_INSTALL_HINT)
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout.splitlines()[:1]
    account = unprivileged_account()  # pgbouncer refuses to run as root
    root = make_workdir("bulkhead-pgb-")
    try:
        os.chmod(root, 0o700)
        account.chown(root)
        userlist = os.path.join(root, "userlist.txt")
        with open(userlist, "w") as f:
            f.write(_userlist_line(APP_ROLE, server.app_password))
            f.write(_userlist_line(server.admin_user, server.admin_password))
        os.chmod(userlist, 0o600)
        account.chown(userlist)
        last: Exception | None = None
        for _ in range(attempts):
            port = free_port()
            try:
                proc = _launch(binary, root, port, server, account)
            except ServerStartError as exc:  # most likely someone took the port: try another
                last = exc
                continue
            return PgBouncer(
                host="127.0.0.1",
                port=port,
                server=server,
                version=version[0] if version else "",
                _proc=proc,
                _root=root,
            )
        raise last or ServerStartError("pgbouncer did not start")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def _launch(binary: str, root: str, port: int, server: PostgresServer, account) -> subprocess.Popen:
    ini = os.path.join(root, f"pgbouncer-{port}.ini")
    with open(ini, "w") as f:
        f.write(_config(server, root, port))
    account.chown(ini)
    log = os.path.join(root, "pgbouncer.log")
    with open(log, "a") as f:
        account.chown(log)
        proc = subprocess.Popen(
            [binary, ini],
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(signal.SIGTERM),
            start_new_session=True,
            **account.popen_kwargs(),
        )
    try:
        wait_until(
            lambda: port_accepts("127.0.0.1", port),
            timeout=30,
            interval=0.05,
            what=f"pgbouncer on port {port}",
            alive=lambda: proc.poll() is None,
        )
    except ServerStartError as exc:
        stop_process(proc, signal.SIGTERM)
        raise ServerStartError(f"{exc}\n{tail(log)}") from None
    return proc

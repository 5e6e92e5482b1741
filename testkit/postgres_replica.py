"""A throwaway PostgreSQL primary with a streaming standby, for failover tests.

The pair is its own cluster (not the session's `postgres`), so stopping its primary disturbs no
other test. The primary is made like the session's server (initdb, loopback, the runtime role
`bulkhead_app`), the standby with `pg_basebackup -R` from it, streaming over the replication
protocol. Replication is SYNCHRONOUS (`synchronous_standby_names`, `synchronous_commit = on`):
a commit returns only once the standby has the WAL, which is what "no committed event lost
after failover" needs; with asynchronous streaming the last commits before a crash can be gone.

`stop_primary()` is `pg_ctl stop -m immediate` (a crash: no shutdown checkpoint) and `promote()`
is `pg_ctl promote` on the standby, the step an operator or a failover manager takes; both are
done without forking pg_ctl (see stop_primary).
Clients reach whichever is primary through a multi-host URL with
`target_session_attrs=read-write` (`multi_host_url`).
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

from testkit.postgres import (
    _INSTALL_HINT,
    PostgresServer,
    _initdb,
    _launch,
    _run_in_thread,
    find_bindir,
)
from testkit.procs import (
    RunAs,
    ServerStartError,
    free_port,
    make_workdir,
    stop_process,
    tail,
    unprivileged_account,
)

STANDBY_NAME = "standby1"
"""The standby's cluster_name, which is also its application_name towards the primary."""

_PRIMARY_SETTINGS = {
    # The session server's settings trade durability for speed; a failover test needs commits
    # to reach the standby before they are acknowledged (fsync stays off: the disk never dies).
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "wal_level": "replica",
    "max_wal_senders": "5",
    "wal_keep_size": "'64MB'",
    "hot_standby": "on",
}


@dataclass
class PostgresPair:
    """A primary and a synchronous streaming standby on loopback; stop one, promote the other."""

    primary: PostgresServer
    """The primary as a PostgresServer (create_database runs there and replicates)."""
    standby_port: int
    """The standby's loopback port."""
    bindir: str
    """PostgreSQL binaries."""
    root: str
    """Temp dir holding primary/ and standby/."""
    account: RunAs
    """The OS account both servers run as."""
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)

    @property
    def primary_port(self) -> int:
        """The original primary's loopback port."""
        return self.primary.port

    def data_dir(self, which: str) -> str:
        """The data directory of `primary` or `standby`."""
        return os.path.join(self.root, which, "data")

    def multi_host_url(self, url: str, *, standby_first: bool = False) -> str:
        """`url` (one of create_database's SQLAlchemy URLs) rewritten to name both servers, with
        `target_session_attrs=read-write`: asyncpg tries them in order and keeps the writable one
        (standby_first lists the read-only standby first, so that choice is really made)."""
        parts = urllib.parse.urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        hosts = [f"127.0.0.1:{self.primary_port}", f"127.0.0.1:{self.standby_port}"]
        if standby_first:
            hosts.reverse()
        query = urllib.parse.urlencode(
            [*(("host", h) for h in hosts), ("target_session_attrs", "read-write")], safe=":"
        )
        return urllib.parse.urlunsplit((parts.scheme, f"{userinfo}@", parts.path, query, ""))

    def stop_primary(self) -> None:
        """Immediate shutdown of the primary: every connection drops, no shutdown checkpoint.

        This is what `pg_ctl stop -m immediate` does (SIGQUIT to the postmaster), sent directly:
        a test process running gRPC must not fork a child that switches user (a plain fork runs
        gRPC's fork handlers, and pg_ctl was seen to die with SIGSEGV that way).
        """
        proc = self._procs.pop("primary", None)
        if proc is not None:
            proc.send_signal(signal.SIGQUIT)
            proc.wait(timeout=30)

    async def promote(self) -> float:
        """Promote the standby (`SELECT pg_promote()`, what `pg_ctl promote` asks for) and wait
        until it accepts writes; returns the seconds taken."""
        import asyncpg

        start = time.monotonic()
        conn = await asyncpg.connect(self.standby_admin_dsn())
        try:
            if not await conn.fetchval("SELECT pg_promote(true, 60)"):
                raise ServerStartError(f"the standby was not promoted within 60 s\n{self.logs()}")
        finally:
            await conn.close()
        return time.monotonic() - start

    async def replication_state(self) -> list[dict]:
        """pg_stat_replication on the primary: who streams, and whether synchronously."""
        import asyncpg

        conn = await asyncpg.connect(self.primary.admin_dsn)
        try:
            rows = await conn.fetch("SELECT application_name, state, sync_state FROM pg_stat_replication")
        finally:
            await conn.close()
        return [dict(r) for r in rows]

    async def wait_replayed(self, *, timeout: float = 30.0) -> None:
        """Wait until the standby has REPLAYED everything the primary wrote so far (a synchronous
        commit only waits until the standby has the WAL on disk, not until it is visible there)."""
        import asyncpg

        primary = await asyncpg.connect(self.primary.admin_dsn)
        try:
            target = await primary.fetchval("SELECT pg_current_wal_lsn()")
        finally:
            await primary.close()
        standby = await asyncpg.connect(self.standby_admin_dsn())
        try:
            deadline = time.monotonic() + timeout
            while not await standby.fetchval("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn", target):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the standby has not replayed {target} after {timeout:.0f}s")
                await asyncio.sleep(0.02)
        finally:
            await standby.close()

    def standby_admin_dsn(self) -> str:
        """The superuser's DSN on the standby (read-only until promoted)."""
        return self.primary.admin_dsn.replace(f":{self.primary_port}/", f":{self.standby_port}/")

    def close(self) -> None:
        """Stop both servers (immediately) and remove the data."""
        for proc in self._procs.values():
            stop_process(proc, signal.SIGQUIT)
        self._procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def logs(self) -> str:
        """The tail of both servers' logs, for failure messages."""
        out = []
        for which, port in (("primary", self.primary_port), ("standby", self.standby_port)):
            out.append(f"--- {which}\n{tail(os.path.join(self.root, which, f'postgres-{port}.log'), 15)}")
        return "\n".join(out)


def _configure(path: str, settings: Mapping[str, str]) -> None:
    with open(path, "a") as conf:
        conf.write("\n# bulkhead failover pair\n")
        for key, value in settings.items():
            conf.write(f"{key} = {value}\n")


def _basebackup(pair: PostgresPair, standby_dir: str) -> None:
    """Copy the primary with pg_basebackup -R (writes standby.signal and primary_conninfo)."""
    env = {**os.environ, "PGPASSWORD": pair.primary.admin_password}
    cmd = [
        os.path.join(pair.bindir, "pg_basebackup"),
        "-h",
        "127.0.0.1",
        "-p",
        str(pair.primary_port),
        "-U",
        pair.primary.admin_user,
        "-D",
        os.path.join(standby_dir, "data"),
        "-R",
        "-X",
        "stream",
        "--checkpoint=fast",
        "--no-sync",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, **pair.account.popen_kwargs())
    if done.returncode != 0:
        raise ServerStartError(f"pg_basebackup failed:\n{done.stdout}{done.stderr}")


async def _make_synchronous(pair: PostgresPair, timeout: float) -> None:
    """Once the standby streams, require it for every commit."""
    import asyncpg

    deadline = time.monotonic() + timeout
    while not any(
        r["application_name"] == STANDBY_NAME and r["state"] == "streaming" for r in await pair.replication_state()
    ):
        if time.monotonic() > deadline:
            raise ServerStartError(f"the standby does not stream after {timeout:.0f}s\n{pair.logs()}")
        await asyncio.sleep(0.1)
    conn = await asyncpg.connect(pair.primary.admin_dsn)
    try:
        await conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()
    while not any(r["sync_state"] == "sync" for r in await pair.replication_state()):
        if time.monotonic() > deadline:
            raise ServerStartError(f"the standby is not synchronous after {timeout:.0f}s\n{pair.logs()}")
        await asyncio.sleep(0.1)


def start_postgres_pair(env: Mapping[str, str] = os.environ, *, timeout: float = 60.0) -> PostgresPair:
    """Start a primary of its own and a synchronous streaming standby from its base backup.

    Call it from a thread that outlives the servers (pytest's main thread): they are asked to die
    with the thread that started them (PR_SET_PDEATHSIG follows the thread, not the process).
    """
    bindir = find_bindir(env)
    if bindir is None:
        raise ServerStartError(_INSTALL_HINT)
    account = unprivileged_account()
    root = make_workdir("bulkhead-pgpair-")
    procs: dict[str, subprocess.Popen] = {}
    pair: PostgresPair | None = None
    try:
        os.chmod(root, 0o700)
        account.chown(root)
        primary_dir, standby_dir = os.path.join(root, "primary"), os.path.join(root, "standby")
        for path in (primary_dir, standby_dir):
            os.mkdir(path, 0o700)
            account.chown(path)
        password = os.urandom(12).hex()
        _initdb(bindir, primary_dir, password, account)
        _configure(os.path.join(primary_dir, "data", "postgresql.conf"), _PRIMARY_SETTINGS)
        primary_port, standby_port = free_port(), free_port()
        procs["primary"] = _launch(bindir, primary_dir, primary_port, account)
        server = PostgresServer(
            host="127.0.0.1",
            port=primary_port,
            admin_user="bulkhead_admin",
            admin_password=password,
            backend="local",
            socket_dir=primary_dir,
        )
        pair = PostgresPair(server, standby_port, bindir, root, account, procs)
        _basebackup(pair, standby_dir)
        # The copied postgresql.conf names the primary's socket dir; later lines win.
        _configure(
            os.path.join(standby_dir, "data", "postgresql.conf"),
            {"unix_socket_directories": f"'{standby_dir}'", "cluster_name": f"'{STANDBY_NAME}'"},
        )
        procs["standby"] = _launch(bindir, standby_dir, standby_port, account)
        _run_in_thread(_make_synchronous(pair, timeout))
        return pair
    except BaseException:
        if pair is not None:
            pair.close()
        else:
            for proc in procs.values():
                stop_process(proc, signal.SIGQUIT)
            shutil.rmtree(root, ignore_errors=True)
        raise

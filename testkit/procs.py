"""Process helpers for the throwaway test servers: free ports, dropping root, dying with pytest."""

from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

_PR_SET_PDEATHSIG = 1


class ServerStartError(RuntimeError):
    """A throwaway test server could not be started; the message says what to install or read."""


_EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
_LOWEST_PORT = 10_000
"""free_port() stays above this: below are the usual fixed ports (PostgreSQL 5432, PgBouncer 6432, OpenBao 8200)."""
_MIN_POOL = 1_000
"""Fewest ports worth a range of its own outside the kernel's ephemeral range."""


def ephemeral_range(path: str = _EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """The kernel's ephemeral port range (what a bind to port 0 or an outgoing connect gets), inclusive."""
    try:
        with open(path) as f:
            low, high = (int(p) for p in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def port_pool(ephemeral: tuple[int, int]) -> range | None:
    """The ports free_port() hands out: a range the kernel never gives a port-0 bind, or None when
    the ephemeral range leaves no room (then free_port() falls back to asking the kernel)."""
    low, high = ephemeral
    # Above first: tests/bulkhead's `up` port bases sit below the (default) ephemeral range.
    for pool in (range(high + 1, 65536), range(_LOWEST_PORT, low)):
        if len(pool) >= _MIN_POOL:
            return pool
    return None


class _PortCursor:
    """Walks the pool from a per-process offset, never handing the same port out twice."""

    def __init__(self, pool: range | None, pid: int) -> None:
        self.pool = pool
        # Spread concurrent test processes over the pool; 7919 (prime) apart per pid.
        self._next = (pid * 7919) % len(pool) if pool else 0
        self._given = 0
        self._lock = threading.Lock()

    def take(self, host: str) -> int:
        with self._lock:
            if self.pool is None or self._given >= len(self.pool):
                return _kernel_port(host)
            for _ in range(len(self.pool) - self._given):
                port = self.pool[self._next]
                self._next = (self._next + 1) % len(self.pool)
                self._given += 1
                if _bindable(host, port):
                    return port
            return _kernel_port(host)


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _kernel_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_cursor: _PortCursor | None = None
_cursor_pid = 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host`, for a server started later (callers retry if
    someone takes it), from outside the kernel's ephemeral range and never the same twice per process.

    Why not bind port 0 and release it: the kernel hands the same range to every port-0 bind and
    outgoing connection, so an in-process gRPC server (or a client socket) could take the port before
    the subprocess binds it; and a port this process used for a server it killed could go to a new
    in-process server while a channel to the dead one still reports "connection refused" for that
    address (gRPC shares a subchannel's state between channels to the same address).
    """
    global _cursor, _cursor_pid
    pid = os.getpid()
    if _cursor is None or _cursor_pid != pid:  # a forked child gets its own walk
        _cursor, _cursor_pid = _PortCursor(port_pool(ephemeral_range()), pid), pid
    return _cursor.take(host)


_OWNER_FILE = ".owner-pid"


def make_workdir(prefix: str) -> str:
    """A fresh temp dir for a server, after removing ones left by killed test runs.

    Each dir records the pid of the process that made it; a dir whose process is gone was
    left by a run killed before its finalizers ran (its server died with it).
    """
    base = tempfile.gettempdir()
    for name in os.listdir(base):
        path = os.path.join(base, name)
        if name.startswith(prefix) and _owner_gone(path):
            shutil.rmtree(path, ignore_errors=True)
    path = tempfile.mkdtemp(prefix=prefix)
    with open(os.path.join(path, _OWNER_FILE), "w") as f:
        f.write(str(os.getpid()))
    return path


def _owner_gone(path: str) -> bool:
    try:
        with open(os.path.join(path, _OWNER_FILE)) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return False  # not ours, or still being set up: leave it alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(
    check: Callable[[], bool],
    *,
    timeout: float,
    interval: float = 0.05,
    what: str,
    alive: Callable[[], bool] = lambda: True,
) -> None:
    """Poll `check` until it is true; raise ServerStartError on timeout or when `alive` turns false."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if not alive():
            raise ServerStartError(f"{what}: the process exited while starting")
        if time.monotonic() > deadline:
            raise ServerStartError(f"{what}: not ready after {timeout:.0f}s")
        time.sleep(interval)


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A preexec_fn asking Linux to send `sig` to the child when pytest dies (even by SIGKILL).

    The libc lookup happens here, in the parent, so the forked child only makes one plain call
    (pytest may have gRPC threads running by then). subprocess runs preexec_fn after switching
    user, which matters because a credential change clears the setting. Pair it with
    start_new_session=True so Ctrl-C reaches pytest (which then stops servers cleanly) first.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the fixtures' finalizers still stop servers
        return None
    signum = int(sig)

    def _preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)

    return _preexec


@dataclass(frozen=True)
class RunAs:
    """The OS account a server runs under (PostgreSQL refuses to run as root)."""

    uid: int | None
    """None: keep the current user."""
    gid: int | None
    """None: keep the current group."""
    name: str
    """Account name, for messages."""

    def popen_kwargs(self) -> dict:
        """Keyword arguments for subprocess that switch to this account."""
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def chown(self, path: str) -> None:
        """Give `path` to this account (no-op when not switching)."""
        if self.uid is not None:
            os.chown(path, self.uid, -1 if self.gid is None else self.gid)  # -1: keep the group


_UNPRIVILEGED_CANDIDATES = ("postgres", "bulkhead-pg")


def unprivileged_account() -> RunAs:
    """The account to run a server as: ourselves, or when we are root an unprivileged account.

    Prefers the `postgres` account the Debian package creates; otherwise creates `bulkhead-pg`.
    """
    if os.geteuid() != 0:
        return RunAs(None, None, pwd.getpwuid(os.geteuid()).pw_name)
    for name in _UNPRIVILEGED_CANDIDATES:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return RunAs(entry.pw_uid, entry.pw_gid, name)
    useradd = shutil.which("useradd")
    if useradd is None:
        raise ServerStartError(
            "running as root and no unprivileged account exists: create one with `useradd --system postgres`"
        )
    subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "bulkhead-pg"],
        check=True,
        capture_output=True,
    )
    entry = pwd.getpwnam("bulkhead-pg")
    return RunAs(entry.pw_uid, entry.pw_gid, "bulkhead-pg")


def stop_process(proc: subprocess.Popen, sig: int, *, timeout: float = 10.0) -> None:
    """Send `sig`, wait, and SIGKILL if the process ignores it."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass


def tail(path: str, lines: int = 30) -> str:
    """The last lines of a log file, for error messages."""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"

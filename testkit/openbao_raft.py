"""A throwaway 3-node OpenBao Raft cluster on loopback, for failover tests.

Each node is `bao server -config=<file>` with integrated Raft storage in its own temp dir,
`retry_join` pointing at the other two, and a plaintext listener on loopback. The harness
initialises node 1 (one key share), unseals every node, waits until all three are Raft voters
and one is active, then mounts KV v2 at `secret/` and Transit at `transit/` as dev mode would.
Namespaces need nothing: OpenBao 2.x serves `sys/namespaces` on Raft as in dev mode.

Settings chosen for tests, and why:
- `disable_standby_reads = true`: since 2.5 a standby answers reads itself, eventually
  consistent, so a version just written through one node could be missing on the next read
  through another. With it, standbys forward every request to the active node.
- `performance_multiplier = 1`: Raft's tightest timings (the default 5 is meant for slow
  disks), so a new leader is elected in about a second instead of about ten.
- Autopilot's server stabilisation time is cut to 1 s and it reconciles every second, or a
  joined node stays a non-voter for 10 s or more and killing the leader meanwhile leaves no
  quorum. Starting still takes ~10 s: retry_join tries every 2 s and the nodes join one by one.
(`disable_mlock` is not set: OpenBao 2.x no longer locks memory and warns about the field.)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field

from testkit.openbao import _INSTALL_HINT, find_bao
from testkit.procs import (
    ServerStartError,
    die_with_parent,
    free_port,
    make_workdir,
    stop_process,
    tail,
    wait_until,
)

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

_CONFIG = """\
ui = false
disable_standby_reads = true
api_addr = "http://127.0.0.1:{api}"
cluster_addr = "https://127.0.0.1:{cluster}"
listener "tcp" {{
  address = "127.0.0.1:{api}"
  cluster_address = "127.0.0.1:{cluster}"
  tls_disable = true
}}
storage "raft" {{
  path = "{data}"
  node_id = "{node_id}"
  performance_multiplier = 1
  autopilot_reconcile_interval = "1s"
  autopilot_update_interval = "1s"
{joins}}}
"""


@dataclass
class RaftNode:
    """One `bao server` of the cluster; killable and restartable on the same ports and data."""

    node_id: str
    """Raft node id (n1, n2, n3)."""
    api_port: int
    """Loopback port of its API listener."""
    cluster_port: int
    """Loopback port of its cluster (Raft and forwarding) listener."""
    workdir: str
    """Its config, data and log live here."""
    binary: str
    """Path of the bao binary."""
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """Base URL of its API."""
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def log_path(self) -> str:
        """Its server log."""
        return os.path.join(self.workdir, "bao.log")

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self._proc is not None and self.running else None

    def write_config(self, peers: list[RaftNode]) -> str:
        """Write its config file (retry_join to every peer) and return its path."""
        data = os.path.join(self.workdir, "data")
        os.makedirs(data, exist_ok=True)
        joins = "".join(f'  retry_join {{\n    leader_api_addr = "{p.url}"\n  }}\n' for p in peers)
        path = os.path.join(self.workdir, "config.hcl")
        with open(path, "w") as f:
            f.write(
                _CONFIG.format(
                    api=self.api_port, cluster=self.cluster_port, data=data, node_id=self.node_id, joins=joins
                )
            )
        return path

    def start(self) -> None:
        """Start the server process (it comes up sealed; the cluster unseals it)."""
        if self.running:
            return
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("BAO_TOKEN", "VAULT_TOKEN", "BAO_ADDR", "VAULT_ADDR", "BAO_NAMESPACE")
        }
        env["HOME"] = self.workdir
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [self.binary, "server", f"-config={os.path.join(self.workdir, 'config.hcl')}"],
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(signal.SIGKILL),
                start_new_session=True,
            )
        wait_until(
            lambda: self.health() is not None, timeout=20, what=f"OpenBao {self.node_id}", alive=lambda: self.running
        )

    def kill(self) -> None:
        """SIGKILL: no graceful step-down, as when a machine dies."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def stop(self) -> None:
        """Graceful stop (SIGTERM, then SIGKILL)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, signal.SIGTERM)

    def health(self) -> dict | None:
        """/v1/sys/health (200 active, 429 standby, 503 sealed all answer), or None when unreachable."""
        try:
            with _NO_PROXY.open(
                f"{self.url}/v1/sys/health?standbyok=true&sealedcode=200&uninitcode=200", timeout=1
            ) as resp:
                return json.load(resp)
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def active(self) -> bool:
        """Whether this node is the unsealed active node (the Raft leader)."""
        body = self.health() or {}
        return not body.get("sealed", True) and not body.get("standby", True)


def _api(url: str, method: str, path: str, body: dict | None = None, token: str | None = None) -> dict:
    """One JSON call to the OpenBao API (used before any hvac client can be made)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{url}/v1/{path}", data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("X-Vault-Token", token)
    with _NO_PROXY.open(req, timeout=10) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else {}


@dataclass
class OpenBaoRaftCluster:
    """Three OpenBao servers in one Raft cluster, initialised and unsealed."""

    nodes: list[RaftNode]
    """The servers, in start order."""
    root_token: str = field(default="", repr=False)
    """The root token from `operator init`."""
    unseal_key: str = field(default="", repr=False)
    """The single unseal key share."""
    workdir: str = ""
    """Parent temp dir of every node's dir."""

    @property
    def urls(self) -> list[str]:
        """Every node's API URL (what a client configured with several addresses gets)."""
        return [n.url for n in self.nodes]

    def leader(self) -> RaftNode | None:
        """The running active node, if there is one right now."""
        return next((n for n in self.nodes if n.running and n.active()), None)

    def wait_for_leader(self, *, timeout: float = 30.0) -> RaftNode:
        """Block until a running node is active, and return it."""
        found: list[RaftNode] = []

        def check() -> bool:
            node = self.leader()
            if node is not None:
                found.append(node)
            return node is not None

        wait_until(check, timeout=timeout, interval=0.05, what="an active OpenBao Raft node")
        return found[-1]

    def unseal(self, node: RaftNode) -> None:
        """Unseal one node with the key share (a node that restarts comes up sealed)."""
        _api(node.url, "PUT", "sys/unseal", {"key": self.unseal_key})

    def restart(self, node: RaftNode, *, timeout: float = 30.0) -> None:
        """Start a stopped or killed node again on its data, unseal it, wait until it is a standby."""
        node.start()
        self.unseal(node)
        wait_until(
            lambda: not (node.health() or {}).get("sealed", True),
            timeout=timeout,
            what=f"OpenBao {node.node_id} unsealed",
        )

    def voters(self) -> dict[str, bool]:
        """node id -> whether Raft counts it as a voter, as the leader sees it."""
        leader = self.wait_for_leader()
        out = _api(leader.url, "GET", "sys/storage/raft/configuration", token=self.root_token)
        return {s["node_id"]: bool(s["voter"]) for s in out["data"]["config"]["servers"]}

    def client(self, *, url: str | None = None, namespace: str | None = None):
        """An hvac.Client with the root token, on `url` (default: the current leader)."""
        import hvac

        return hvac.Client(url=url or self.wait_for_leader().url, token=self.root_token, namespace=namespace)

    def close(self) -> None:
        """Stop every node and remove the temp dirs."""
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def logs(self) -> str:
        """The tail of every node's log, for failure messages."""
        return "\n".join(f"--- {n.node_id}\n{tail(n.log_path, 15)}" for n in self.nodes)


def _bootstrap(cluster: OpenBaoRaftCluster, timeout: float) -> None:
    first, rest = cluster.nodes[0], cluster.nodes[1:]
    out = _api(first.url, "PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1})
    cluster.root_token, cluster.unseal_key = out["root_token"], out["keys_base64"][0]
    cluster.unseal(first)
    wait_until(first.active, timeout=timeout, what="OpenBao n1 active")
    _api(
        first.url,
        "POST",
        "sys/storage/raft/autopilot/configuration",
        {"server_stabilization_time": "1s", "cleanup_dead_servers": False},
        token=cluster.root_token,
    )
    pending = list(rest)

    def joined() -> bool:
        # retry_join fetches a challenge from the leader that only the unseal key opens: keep
        # unsealing every node (all at once, each join waits out a 2 s retry) until it is a standby.
        for node in list(pending):
            body = node.health() or {}
            if not body.get("sealed", True):
                pending.remove(node)
                continue
            with contextlib.suppress(urllib.error.URLError, OSError):
                cluster.unseal(node)
        return not pending

    wait_until(joined, timeout=timeout, interval=0.2, what="OpenBao standbys joined")

    def all_voters() -> bool:
        voters = cluster.voters()
        return len(voters) == len(cluster.nodes) and all(voters.values())

    wait_until(all_voters, timeout=timeout, interval=0.2, what="every OpenBao node a Raft voter")
    for path, kind, options in (("secret", "kv", {"version": "2"}), ("transit", "transit", {})):
        _api(first.url, "POST", f"sys/mounts/{path}", {"type": kind, "options": options}, token=cluster.root_token)


def start_openbao_raft(
    env: Mapping[str, str] = os.environ, *, size: int = 3, timeout: float = 60.0
) -> OpenBaoRaftCluster:
    """Start, initialise and unseal a `size`-node Raft cluster on free loopback ports."""
    binary = find_bao(env)
    if binary is None:
        raise ServerStartError(_INSTALL_HINT)
    root = make_workdir("bulkhead-baoraft-")
    nodes = []
    for i in range(1, size + 1):
        workdir = os.path.join(root, f"n{i}")
        os.makedirs(workdir)
        nodes.append(RaftNode(f"n{i}", free_port(), free_port(), workdir, binary))
    cluster = OpenBaoRaftCluster(nodes, workdir=root)
    try:
        for node in nodes:
            node.write_config([p for p in nodes if p is not node])
            node.start()
        _bootstrap(cluster, timeout)
    except BaseException as exc:
        logs = cluster.logs()
        cluster.close()
        if isinstance(exc, (ServerStartError, urllib.error.URLError, OSError, KeyError)):
            raise ServerStartError(f"OpenBao Raft cluster did not start: {exc}\n{logs}") from None
        raise
    return cluster

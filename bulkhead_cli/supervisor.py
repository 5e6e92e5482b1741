"""Runs the mesh on one machine: each service its own process (or N replicas of it), health-checked,
restarted when it dies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.util import find_spec

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.config import SERVICES, service_addr
from shared.service_config import channel_target

STOP_ORDER = (("console",), ("orchestrator",), ("inference", "state"), ("metering", "credentials", "identity"))
"""Stop waves: a service stops only after those that call it, so it can still take their last writes
(the proxy returns unspent budget leases to metering on its way down; the console revokes its sessions' tokens)."""

RECENT_LINES = 20
"""Log lines kept per service for the error shown when it fails to start."""

RESTART_BACKOFF = (0.5, 1, 2, 5, 10)
"""Seconds to wait before restarting a service that died: the nth restart in a row waits the nth value."""

REPLICA_STRIDE = 10
"""Replica i (from 0) of a service listens on its port + i * REPLICA_STRIDE, metrics alike (50053, 50063, ...):
the ports of `up` (base+51..56, +80 the console, +151..156 metrics) never collide up to MAX_REPLICAS."""

MAX_REPLICAS = 8
"""Most processes per service `up` runs: 6 x 8 already crowds one machine, and from 10 on a replica's gRPC
port would reach the metrics ports (base+151..)."""


def available_services() -> list[str]:
    """The services of this checkout that can run (those with a services/<name>/__main__.py)."""
    return [s for s in SERVICES if find_spec(f"services.{s}.__main__") is not None]


@dataclass
class ServiceProcess:
    """One supervised service."""

    name: str
    """The service (identity, state, ...): what stop order and `python -m services.<name>` go by."""
    address: str
    """Where this process listens."""
    replica: int = 0
    """Which replica of the service this is, from 0."""
    label: str = ""
    """How logs and the status table name it: the service, or `state#2` when there are several."""
    env: dict[str, str] = field(default_factory=dict, repr=False)
    """Variables only this replica gets (its own listen address, metrics port, replica id)."""
    module: str = ""
    """What `python -m` runs (default services.<name>)."""
    http: bool = False
    """Health-checked with GET /healthz instead of the gRPC health service (the console)."""
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    state: str = "starting"
    started_at: float = 0.0
    log_task: asyncio.Task | None = field(default=None, repr=False)
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=RECENT_LINES), repr=False)
    """Its last log lines, shown when it dies while starting (also with --quiet)."""

    def __post_init__(self) -> None:
        self.label = self.label or self.name


class Supervisor:
    """Starts, watches and stops the services."""

    def __init__(
        self,
        services: list[str],
        env: Mapping[str, str],
        *,
        echo: Callable[[str], None] = print,
        show_logs: bool = True,
        console: str | None = None,
        replicas: int = 1,
    ):
        if not 1 <= replicas <= MAX_REPLICAS:
            raise ValueError(f"replicas must be 1..{MAX_REPLICAS}, got {replicas}")
        self.env = dict(env)
        self.echo = echo
        self.show_logs = show_logs
        self.procs: dict[str, ServiceProcess] = {}
        for name in services:
            for proc in replica_processes(name, self.env, replicas):
                self.procs[proc.label] = proc
            if replicas > 1:  # every caller (services, console, CLI) dials all of them
                self.env[f"BULKHEAD_{name.upper()}_ADDR"] = channel_target(
                    ",".join(p.address for p in self.procs.values() if p.name == name)
                )
        if console:  # the web console: a client of the others, started last, stopped first
            self.procs["console"] = ServiceProcess("console", console, label="console", module="console", http=True)
            self.env["BULKHEAD_CONSOLE_ADDR"] = console
        self._stopping = False
        self._watchers: list[asyncio.Task] = []

    async def start(self, timeout: float = 60.0) -> None:
        """Start identity first (every other service fetches its keys), then the first replica of the others,
        then their other replicas; wait until all are healthy."""
        taken = [p.address for p in self.procs.values() if not port_is_free(p.address)]
        if taken:  # else a health check could be answered by someone else's server
            raise RuntimeError(
                f"already in use: {', '.join(taken)}. Is another `bulkhead up` running? "
                "Stop it, or pass --port-base to use other ports."
            )
        # A first start migrates the database and makes keys; a second process doing so at the same time
        # would race it. So one replica of each service starts alone, and its siblings once it is healthy.
        first = [label for label, p in self.procs.items() if p.name == "identity" and p.replica == 0]
        firsts = [label for label, p in self.procs.items() if p.replica == 0 and label not in first]
        others = [label for label, p in self.procs.items() if p.replica > 0]
        for wave in (first, firsts, others):
            for label in wave:
                await self._spawn(self.procs[label])
            await self.wait_healthy(wave, timeout)
        self._watchers = [asyncio.create_task(self._watch(p)) for p in self.procs.values()]

    async def _spawn(self, proc: ServiceProcess) -> None:
        proc.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            proc.module or f"services.{proc.name}",
            env={**self.env, **proc.env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        proc.started_at = time.monotonic()
        proc.state = "starting"
        proc.log_task = asyncio.create_task(self._pump_logs(proc))

    async def _pump_logs(self, proc: ServiceProcess) -> None:
        assert proc.process and proc.process.stdout
        async for raw in proc.process.stdout:
            line = format_log_line(proc.label, raw.decode(errors="replace").rstrip("\n"))
            proc.recent.append(line)
            if self.show_logs:
                self.echo(line)

    async def wait_healthy(self, names: list[str], timeout: float) -> None:
        """Poll each service's gRPC health check until SERVING; raise with the laggards named on timeout."""
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending:
            for name in list(pending):
                proc = self.procs[name]
                if proc.process and proc.process.returncode is not None:
                    if proc.log_task is not None:  # its last words may still be in the pipe
                        await asyncio.wait([proc.log_task], timeout=2)
                    said = (
                        "its log lines above say why"
                        if self.show_logs
                        else ("its last log lines:\n" + "\n".join(proc.recent) if proc.recent else "it logged nothing")
                    )
                    raise RuntimeError(f"{name} exited with code {proc.process.returncode} while starting; {said}")
                if await (check_http_health(proc.address) if proc.http else check_health(proc.address)):
                    proc.state = "healthy"
                    pending.discard(name)
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"not healthy after {timeout:.0f}s: {', '.join(sorted(pending))}")
            if pending:
                await asyncio.sleep(0.2)

    async def _watch(self, proc: ServiceProcess) -> None:
        """Restart a service whose process died (with backoff), and report it."""
        while not self._stopping:
            assert proc.process
            code = await proc.process.wait()
            if self._stopping:
                return
            proc.state = "restarting"
            delay = RESTART_BACKOFF[min(proc.restarts, len(RESTART_BACKOFF) - 1)]
            self.echo(f"!! {proc.label} exited with code {code}; restarting in {delay}s (restart #{proc.restarts + 1})")
            await asyncio.sleep(delay)
            proc.restarts += 1
            await self._spawn(proc)
            try:
                await self.wait_healthy([proc.label], 60)
                self.echo(f"!! {proc.label} is healthy again (pid {proc.process.pid})")
            except (RuntimeError, TimeoutError) as exc:
                self.echo(f"!! {proc.label} failed to come back: {exc}")

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the services callers first (so they can flush to those they call), SIGKILL what outlives grace."""
        self._stopping = True
        for task in self._watchers:
            task.cancel()
        deadline = time.monotonic() + grace
        for wave in (*STOP_ORDER, tuple(p.name for p in self.procs.values())):  # last: anything not named above
            live = [
                p.process for p in self.procs.values() if p.name in wave and p.process and p.process.returncode is None
            ]
            for proc in live:
                _signal_group(proc.pid, signal.SIGTERM)
            for proc in live:
                try:
                    await asyncio.wait_for(proc.wait(), max(deadline - time.monotonic(), 0.1))
                except TimeoutError:
                    _signal_group(proc.pid, signal.SIGKILL)
                    await proc.wait()
        for p in self.procs.values():
            if p.log_task:
                p.log_task.cancel()
            p.state = "stopped"

    def rows(self) -> list[list[str]]:
        """One row per process (every replica) for the status table."""

        def metrics(p: ServiceProcess) -> str:
            port = p.env.get(f"BULKHEAD_{p.name.upper()}_METRICS_PORT") or self.env.get(
                f"BULKHEAD_{p.name.upper()}_METRICS_PORT"
            )
            return f"http://127.0.0.1:{port}/metrics" if port not in (None, "0") and not p.http else "off"

        return [
            [
                p.label,
                f"http://{p.address}/" if p.http else p.address,
                metrics(p),
                str(p.process.pid if p.process else ""),
                p.state,
                str(p.restarts),
            ]
            for p in self.procs.values()
        ]


def replica_processes(name: str, env: Mapping[str, str], replicas: int) -> list[ServiceProcess]:
    """The processes of one service: one at BULKHEAD_<SVC>_ADDR, or `replicas` on ports REPLICA_STRIDE apart."""
    address = service_addr(name, env)
    if replicas == 1:
        return [ServiceProcess(name, address, label=name)]
    host, _, port = address.rpartition(":")
    if not port.isdigit() or "," in address:
        raise ValueError(
            f"BULKHEAD_{name.upper()}_ADDR must be one host:port to place {replicas} replicas, got {address!r}"
        )
    metrics = env.get(f"BULKHEAD_{name.upper()}_METRICS_PORT", "0")
    procs = []
    for i in range(replicas):
        own = {
            f"BULKHEAD_{name.upper()}_LISTEN_ADDR": f"{host}:{int(port) + i * REPLICA_STRIDE}",
            f"BULKHEAD_{name.upper()}_METRICS_PORT": str(int(metrics) + i * REPLICA_STRIDE) if metrics != "0" else "0",
        }
        if name == "inference":  # a restarted replica keeps its name, so it settles its predecessor's attempts at once
            own["BULKHEAD_INFERENCE_REPLICA_ID"] = f"{env.get('BULKHEAD_INFERENCE_REPLICA_ID') or 'inference'}-{i + 1}"
        procs.append(
            ServiceProcess(
                name, own[f"BULKHEAD_{name.upper()}_LISTEN_ADDR"], replica=i, label=f"{name}#{i + 1}", env=own
            )
        )
    return procs


def port_is_free(address: str) -> bool:
    """Whether host:port can be bound right now."""
    host, _, port = address.rpartition(":")
    with socket.socket() as sock:
        try:
            sock.bind((host or "127.0.0.1", int(port)))
        except OSError:
            return False
    return True


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


async def check_health(address: str, timeout: float = 1.0) -> bool:
    """Whether the server at address answers its gRPC health check with SERVING."""
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            resp = await stub.Check(  # type: ignore[attr-defined]  # types-grpcio-health-checking lists no RPCs
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
            return resp.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.aio.AioRpcError:
        return False


async def check_http_health(address: str, timeout: float = 1.0) -> bool:
    """Whether the HTTP server at address answers GET /healthz with 200."""
    host, _, port = address.rpartition(":")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host or "127.0.0.1", int(port)), timeout)
    except (TimeoutError, OSError):
        return False
    try:
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), timeout)
        return status.split(b" ")[1:2] == [b"200"]
    except (TimeoutError, OSError, IndexError):
        return False
    finally:
        writer.close()


_LEVEL_MARK = {"warning": "WARN", "error": "ERROR", "critical": "CRIT"}


def format_log_line(service: str, line: str) -> str:
    """A service's JSON log line as one readable line: `[service] LEVEL message (tenant=…)`."""
    try:
        record = json.loads(line)
    except ValueError:
        return f"[{service:>12}] {line}"
    if not isinstance(record, dict):
        return f"[{service:>12}] {line}"
    level = _LEVEL_MARK.get(record.get("level", ""), "")
    tags = " ".join(f"{k}={record[k]}" for k in ("tenant_id", "request_id", "reason", "method") if record.get(k))
    text = f"[{service:>12}] {level + ' ' if level else ''}{record.get('message', '')}"
    text = f"{text}  ({tags})" if tags else text
    # The traceback (already scrubbed of secrets by shared.logs) is what tells an operator the cause.
    trace = record.get("exception")
    if isinstance(trace, str) and trace:
        text += "".join(f"\n[{service:>12}]   {row}" for row in trace.rstrip().splitlines())
    return text

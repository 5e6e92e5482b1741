"""A service process: its event loop, its heap after start-up, and worker processes sharing one port.

Light on purpose: a parent that only runs workers imports this and its service's config, not the service.
Several workers are several replicas on one host, bound to one host:port with SO_REUSEPORT (the kernel
spreads connections over them); whatever must be exact across replicas is already arbitrated by the
database, so it stays exact across workers.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

GC_THRESHOLDS = (20_000, 20, 20)
"""The cyclic collector's thresholds while serving. A young collection walks the container objects
alive at that moment (the calls in flight), whatever the threshold; with Python's default 700 it ran
every call or two, about 4% of the proxy's CPU at concurrency 32. A larger first threshold walks the
same live set 30 times less often (the garbage in between is freed by reference counting)."""


def run_loop(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run main() on uvloop when it is installed (a tenth to a fifth less CPU per call than asyncio's own
    loop: bench/proxy.py and bench/metering.py measure both), else on asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


def freeze_startup_heap() -> None:
    """Exempt what start-up allocated (modules, descriptors) from the cyclic collector, collect young
    objects less often (GC_THRESHOLDS), and hand the heap start-up freed back to the OS.

    Those objects live as long as the process; without this every full collection walks them
    again, which showed as pauses in the tail latency under load.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    _release_free_heap()


def _release_free_heap() -> None:
    """Hand the heap pages start-up freed (migrations, import-time work) back to the OS: glibc keeps them
    mapped otherwise, and they count in the process's RSS for as long as it runs."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        pass


def worker_env_var(service: str) -> str:
    """The variable set (1..N) in each worker process's environment: BULKHEAD_<SERVICE>_WORKER."""
    return f"BULKHEAD_{service.upper()}_WORKER"


def hold_port(address: str) -> tuple[str, socket.socket | None]:
    """host:port for workers to share; a port of 0 is drawn here and held (bound with SO_REUSEPORT, not
    listening) so every worker gets the same one. Close the socket once the workers have stopped."""
    host, _, port = address.rpartition(":")
    host = host or "127.0.0.1"
    if int(port) != 0:
        return f"{host}:{port}", None
    holder = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((host.strip("[]"), 0))
    return f"{host}:{holder.getsockname()[1]}", holder


def serve_workers(
    service: str,
    count: int,
    address: str,
    command: Sequence[str],
    *,
    env: Mapping[str, str] = os.environ,
    extra_env: Callable[[int, str], Mapping[str, str]] | None = None,
    on_ready: Callable[[str], None] | None = None,
    ready: Callable[[subprocess.Popen], bool] | None = None,
    stdout: int | None = None,
    metrics_port: int = 0,
    metrics_addr: str = "127.0.0.1",
) -> int:
    """Run `count` processes of `command` serving `address`, until SIGTERM/SIGINT or one of them exits.

    Worker i gets env plus BULKHEAD_<SERVICE>_WORKER=i, BULKHEAD_<SERVICE>_LISTEN_ADDR (the shared
    host:port, a drawn one for port 0) and extra_env(i, host:port). No worker serves metrics itself: with a
    metrics_port this process serves /metrics there, the sum of every worker's (WorkerMetrics).
    The first starts alone (it migrates the database), the others once it is ready
    (default: the port accepts connections; `ready(proc)`, when given, is asked of every worker, e.g.
    reading its stdout=PIPE). on_ready gets host:port once they are started.
    Returns the exit code: 0 after a signal, else the code of the worker that ended first.
    """
    metrics = WorkerMetrics(metrics_port, metrics_addr) if metrics_port else None  # first: a port in use stops here
    address, holder = hold_port(address)
    prefix = f"BULKHEAD_{service.upper()}_"
    procs: list[subprocess.Popen] = []
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for i in range(1, count + 1):
            own = {**env, worker_env_var(service): str(i), prefix + "LISTEN_ADDR": address}
            own[prefix + "METRICS_PORT"] = "0"
            if metrics is not None:
                own[MULTIPROC_DIR_ENV] = metrics.directory
            own.update(extra_env(i, address) if extra_env is not None else {})
            procs.append(subprocess.Popen(list(command), env=own, stdout=stdout))
            if ready is not None:
                if not ready(procs[-1]):
                    break
            elif i == 1 and not _wait_listening(procs[0], address, stop):
                break
        else:
            if on_ready is not None and not stop.is_set():
                on_ready(address)
        while not stop.is_set() and all(p.poll() is None for p in procs):
            stop.wait(0.2)
        ended = next((p.returncode for p in procs if p.poll() is not None), None)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if holder is not None:
            holder.close()
        if metrics is not None:
            metrics.close()
    return 0 if stop.is_set() else (ended or 1)


MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus_client's multiprocess mode: set before it is imported, a process writes its samples to files there."""


class WorkerMetrics:
    """/metrics for a set of workers, served by their parent: the sum of every worker's samples.

    Each worker runs prometheus_client in multiprocess mode (MULTIPROC_DIR_ENV names a directory of this run's)
    and the parent's MultiProcessCollector reads them all, so one scrape of the configured port counts every
    call whichever worker served it (a port per worker would need a scrape target per worker). Counters and
    histograms add up; process_* metrics of the workers are not exported in this mode.
    """

    def __init__(self, port: int, addr: str = "127.0.0.1") -> None:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        self.directory = tempfile.mkdtemp(prefix="bulkhead-metrics-")
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.directory)
        try:
            self._server, _ = start_http_server(port, addr=addr, registry=registry)
        except OSError:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise

    def close(self) -> None:
        """Stop serving and remove the workers' sample files (they have stopped)."""
        self._server.shutdown()
        self._server.server_close()
        shutil.rmtree(self.directory, ignore_errors=True)


def _wait_listening(proc: subprocess.Popen, address: str, stop: threading.Event, timeout: float = 120.0) -> bool:
    """Wait until the first worker serves (it migrated the database); False when it ended or we were stopped."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set() and proc.poll() is None:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=0.5):
                return True
        except OSError:
            stop.wait(0.1)
    return False

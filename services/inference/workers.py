"""Worker processes of the inference proxy on one port (BULKHEAD_INFERENCE_WORKERS, SO_REUSEPORT).

Light on purpose: the parent that runs the workers imports this and the config only, not the proxy.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from services.inference.config import InferenceConfig

WORKER_ENV = "BULKHEAD_INFERENCE_WORKER"
"""Set (1..N) in the environment of each worker process that serve_workers starts."""


def serve_workers(
    config: InferenceConfig,
    command: Sequence[str],
    *,
    env: Mapping[str, str] = os.environ,
    on_ready: Callable[[str], None] | None = None,
    ready: Callable[[subprocess.Popen], bool] | None = None,
    stdout: int | None = None,
) -> int:
    """Run config.workers processes of `command` serving one port, until SIGTERM/SIGINT or one of them exits.

    Each worker is a whole proxy (its own event loop, leases, holder name, attempt journal replica
    `<replica>-w<i>`), bound to the same host:port with SO_REUSEPORT. A port of 0 is drawn here first
    and held (bound, not listening) so every worker gets the same one. The first worker starts alone
    (it migrates the database), the others once it is ready (default: the port accepts connections;
    `ready(proc)`, when given, is asked of every worker, e.g. reading its stdout=PIPE). Only the first
    serves metrics on the configured port. on_ready gets host:port once they are started.
    Returns the exit code: 0 after a signal, else the code of the worker that ended first.
    """
    host, _, port = config.service.address.rpartition(":")
    host = host or "127.0.0.1"
    holder = None
    if int(port) == 0:
        holder = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((host.strip("[]"), 0))
        port = str(holder.getsockname()[1])
    address = f"{host}:{port}"
    replica = config.replica_id or replica_name(address)
    procs: list[subprocess.Popen] = []
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for i in range(1, config.workers + 1):
            own = {
                **env,
                WORKER_ENV: str(i),
                "BULKHEAD_INFERENCE_LISTEN_ADDR": address,
                "BULKHEAD_INFERENCE_REPLICA_ID": f"{replica}-w{i}",
            }
            if i > 1:
                own["BULKHEAD_INFERENCE_METRICS_PORT"] = "0"
            procs.append(subprocess.Popen(list(command), env=own, stdout=stdout))
            if ready is not None:
                if not ready(procs[-1]):
                    break
            elif i == 1 and not _wait_listening(procs[0], address, stop):
                break
        else:
            if on_ready is not None and not stop.is_set():
                on_ready(address)
        while not stop.is_set():
            if any(p.poll() is not None for p in procs):
                break
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
    return 0 if stop.is_set() else (ended or 1)


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


def replica_name(address: str) -> str:
    """Host and port; a random port (0) gets a random name, so only the sweeper settles what it leaves."""
    port = address.rsplit(":", 1)[-1]
    return f"{socket.gethostname()}:{port if port != '0' else uuid.uuid4().hex[:12]}"


GC_THRESHOLDS = (20_000, 20, 20)
"""The cyclic collector's thresholds while serving. A young collection walks the container objects
alive at that moment (the calls in flight), whatever the threshold; with Python's default 700 it ran
every call or two, about 4% of the proxy's CPU at concurrency 32. A larger first threshold walks the
same live set 30 times less often (the garbage in between is freed by reference counting)."""


def freeze_startup_heap() -> None:
    """Exempt what start-up allocated (modules, descriptors) from the cyclic collector, and collect young
    objects less often (GC_THRESHOLDS).

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


def run_loop(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run main() on uvloop when it is installed (about a fifth less CPU per proxied call than asyncio's
    own loop, measured with bench/proxy.py), else on asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())

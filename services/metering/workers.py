"""Metering's process settings: the event loop, the heap after start-up, and worker processes on one port
(BULKHEAD_METERING_WORKERS, SO_REUSEPORT).

Light on purpose: the parent that runs the workers imports this and the config only, not the service.
The inference proxy has the same three pieces (services/inference/workers.py); services never import
each other, so they are repeated here until they move to shared/.

Several workers are several replicas on one host: Postgres arbitrates every hold and settlement (one
conditional statement each), so budgets stay exact and a keyed reservation or a settlement is taken
once whichever worker runs it; each worker keeps its own caches (budget specs, prices) with the
staleness bound replicas already have, and sweeps as a replica does (the guarded UPDATE expires a
hold once however many sweep).
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
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

WORKER_ENV = "BULKHEAD_METERING_WORKER"
"""Set (1..N) in the environment of each worker process that serve_workers starts."""

GC_THRESHOLDS = (20_000, 20, 20)
"""The cyclic collector's thresholds while serving: a young collection walks the calls in flight whatever
the threshold, and Python's default 700 ran one every call or two (as measured on the inference proxy)."""


def run_loop(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run main() on uvloop when it is installed (less CPU per call than asyncio's own loop: bench/metering.py
    shows both), else on asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


def freeze_startup_heap() -> None:
    """Exempt what start-up allocated (modules, descriptors) from the cyclic collector, collect young objects
    less often (GC_THRESHOLDS), and hand the heap start-up freed back to the OS."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        pass


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


def serve_workers(workers: int, address: str, command: Sequence[str], *, env: Mapping[str, str] = os.environ) -> int:
    """Run `workers` processes of `command` serving `address`, until SIGTERM/SIGINT or one of them exits.

    The first starts alone (it migrates the database), the others once it accepts connections; only the
    first serves metrics on the configured port (the others' counters are not exported, as for the
    inference proxy's workers). Returns the exit code: 0 after a signal, else the code of the worker that
    ended first.
    """
    address, holder = hold_port(address)
    procs: list[subprocess.Popen] = []
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for i in range(1, workers + 1):
            own = {**env, WORKER_ENV: str(i), "BULKHEAD_METERING_LISTEN_ADDR": address}
            if i > 1:
                own["BULKHEAD_METERING_METRICS_PORT"] = "0"
            procs.append(subprocess.Popen(list(command), env=own))
            if i == 1 and not _wait_listening(procs[0], address, stop):
                break
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

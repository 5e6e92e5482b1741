"""shared.process: the event loop every service runs on, its heap after start-up, and a shared worker port."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from shared import process
from testkit.workers import WORKER_SCRIPT


@pytest.fixture
def restored_gc():
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_freeze_startup_heap_exempts_what_exists_and_collects_young_objects_less_often(restored_gc):
    gc.unfreeze()
    process.freeze_startup_heap()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == process.GC_THRESHOLDS


def test_run_loop_runs_main_on_uvloop_when_installed():
    uvloop = pytest.importorskip("uvloop")

    async def main() -> type:
        return type(asyncio.get_running_loop())

    assert process.run_loop(main) is uvloop.Loop


def test_hold_port_draws_one_port_for_port_zero_and_keeps_a_given_one():
    address, holder = process.hold_port("127.0.0.1:0")
    assert holder is not None
    try:
        port = int(address.rpartition(":")[2])
        assert port == holder.getsockname()[1] and port != 0
        # Held with SO_REUSEPORT: a worker binding the same port with it set succeeds.
        with socket.socket() as worker:
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
    finally:
        holder.close()
    assert process.hold_port("127.0.0.1:5000") == ("127.0.0.1:5000", None)


def test_worker_env_var_names_the_service():
    assert process.worker_env_var("metering") == "BULKHEAD_METERING_WORKER"


def test_serve_workers_starts_each_worker_on_one_drawn_port_and_stops_them_on_sigterm():
    """Port 0 is drawn once for all; each worker has its number and its extra env, only the first serves
    metrics; SIGTERM to the parent stops every worker and returns 0."""
    seen, procs, addresses = [], [], []

    def ready(proc: subprocess.Popen) -> bool:
        procs.append(proc)
        seen.append(json.loads(proc.stdout.readline()))
        return True

    def on_ready(address: str) -> None:
        addresses.append(address)
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()

    env = {**{k: v for k, v in os.environ.items() if k != "BULKHEAD_DEMO_WORKER"}, "BULKHEAD_DEMO_METRICS_PORT": "9999"}
    code = process.serve_workers(
        "demo",
        3,
        "127.0.0.1:0",
        [sys.executable, "-c", WORKER_SCRIPT, "demo"],
        env=env,
        extra_env=lambda i, address: {"BULKHEAD_DEMO_NAME": f"{address}#{i}"},
        ready=ready,
        on_ready=on_ready,
        stdout=subprocess.PIPE,
    )
    assert code == 0
    assert [s["BULKHEAD_DEMO_WORKER"] for s in seen] == ["1", "2", "3"]
    assert {s["BULKHEAD_DEMO_LISTEN_ADDR"] for s in seen} == set(addresses) and not addresses[0].endswith(":0")
    assert [s["BULKHEAD_DEMO_NAME"] for s in seen] == [f"{addresses[0]}#{i}" for i in (1, 2, 3)]
    assert [s["BULKHEAD_DEMO_METRICS_PORT"] for s in seen] == ["9999", "0", "0"]
    assert all(p.poll() is not None for p in procs)


def test_serve_workers_returns_the_code_of_a_worker_that_ended():
    """A worker that dies ends the others and the parent, with its exit code."""
    assert process.serve_workers("demo", 2, "127.0.0.1:0", [sys.executable, "-c", "import sys; sys.exit(3)"]) == 3

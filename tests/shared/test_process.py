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
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

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
    """Port 0 is drawn once for all; each worker has its number and its extra env, none serves metrics itself;
    SIGTERM to the parent stops every worker and returns 0."""
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
    assert [s["BULKHEAD_DEMO_METRICS_PORT"] for s in seen] == ["0", "0", "0"]
    assert all(p.poll() is not None for p in procs)


def test_serve_workers_returns_the_code_of_a_worker_that_ended():
    """A worker that dies ends the others and the parent, with its exit code."""
    assert process.serve_workers("demo", 2, "127.0.0.1:0", [sys.executable, "-c", "import sys; sys.exit(3)"]) == 3


COUNTING_WORKER = """
import os, signal, sys, time
from prometheus_client import Counter, Histogram
worker = int(os.environ["BULKHEAD_DEMO_WORKER"])
Counter("demo_calls", "calls served", ["code"]).labels("OK").inc(worker)
Histogram("demo_seconds", "call time").observe(0.01 * worker)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
print(os.environ["PROMETHEUS_MULTIPROC_DIR"], flush=True)
while True:
    time.sleep(1)
"""


def test_serve_workers_serves_every_workers_metrics_summed_on_the_metrics_port():
    """One scrape of the configured port counts what every worker counted (3 workers: 1 + 2 + 3 calls), and
    the workers' sample files are gone after they stop."""
    with socket.socket() as probe:  # a free port for the metrics
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    directories, scraped = [], []

    def ready(proc: subprocess.Popen) -> bool:
        directories.append(proc.stdout.readline().strip().decode())
        return True

    def on_ready(address: str) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
            scraped.append(reply.read().decode())
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()

    env = {k: v for k, v in os.environ.items() if k not in ("BULKHEAD_DEMO_WORKER", process.MULTIPROC_DIR_ENV)}
    code = process.serve_workers(
        "demo",
        3,
        "127.0.0.1:0",
        [sys.executable, "-c", COUNTING_WORKER],
        env=env,
        ready=ready,
        on_ready=on_ready,
        stdout=subprocess.PIPE,
        metrics_port=metrics_port,
    )
    assert code == 0
    families = text_string_to_metric_families(scraped[0])
    samples = {(s.name, tuple(s.labels.items())): s.value for f in families for s in f.samples}
    assert samples["demo_calls_total", (("code", "OK"),)] == 6.0
    assert samples["demo_seconds_count", ()] == 3.0 and abs(samples["demo_seconds_sum", ()] - 0.06) < 1e-9
    assert len(set(directories)) == 1 and not os.path.exists(directories[0])


def test_serve_workers_refuses_a_metrics_port_in_use_before_starting_any_worker():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            process.serve_workers(
                "demo", 2, "127.0.0.1:0", [sys.executable, "-c", "exit(9)"], metrics_port=taken.getsockname()[1]
            )

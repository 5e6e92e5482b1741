"""shared.process: the event loop every service runs on, its heap after start-up, and a shared worker port."""

from __future__ import annotations

import asyncio
import gc
import socket

import pytest

from shared import process


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

"""Worker processes on one port (BULKHEAD_INFERENCE_WORKERS): SO_REUSEPORT only when asked for, every worker serves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import grpc
import pytest

from bulkhead.inference.v1 import inference_pb2 as pb
from bulkhead.inference.v1 import inference_pb2_grpc
from services.inference.config import InferenceConfig
from services.inference.server import start
from services.inference.workers import WORKER_ENV, serve_workers
from testkit.workers import WORKER_SCRIPT

from .helpers import INFERENCE_MIGRATIONS, MODEL, _open

REQUEST = pb.CreateMessageRequest(
    params=pb.MessageParams(
        model=MODEL,
        max_tokens=20,
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=pb.TextBlock(text="hello there"))])],
    )
)


async def _start(mesh, database: str, workers: int, address: str):
    config = InferenceConfig.from_env({**mesh.env(database), "BULKHEAD_INFERENCE_WORKERS": str(workers)})
    db = await _open(mesh.tmp / database, INFERENCE_MIGRATIONS, mesh.templates)
    return await start(config, mesh.tokens.verifier, address=address, db=db, tiers=mesh.tiers)


async def test_two_workers_share_a_port_and_both_serve(mesh):
    """With 2 workers both proxies bind one port; calls over many connections reach each of them."""
    first = await _start(mesh, "w1.db", 2, "127.0.0.1:0")
    second = await _start(mesh, "w2.db", 2, first.running.address)
    channels = [
        grpc.aio.insecure_channel(first.running.address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(16)
    ]
    try:
        assert second.running.port == first.running.port
        for channel in channels:
            reply = await inference_pb2_grpc.InferenceServiceStub(channel).CreateMessage(
                REQUEST, metadata=mesh.md("t_a")
            )
            assert reply.content[0].text
        served = [len(s.proxy._replays._entries) for s in (first, second)]
        assert sum(served) == 16 and all(served), served
    finally:
        for channel in channels:
            await channel.close()
        await second.stop()
        await first.stop()


async def test_a_single_proxy_refuses_a_port_in_use(mesh):
    """One worker (the default) keeps gRPC's refusal of a port another process holds: no silent sharing."""
    first = await _start(mesh, "w1.db", 1, "127.0.0.1:0")
    try:
        with pytest.raises((OSError, RuntimeError)):
            await _start(mesh, "w2.db", 1, first.running.address)
    finally:
        await first.stop()


def test_serve_workers_starts_each_worker_on_one_drawn_port_and_stops_them_on_sigterm():
    """Port 0 is drawn once for all; each worker has its own number and journal replica, only the first
    serves metrics; SIGTERM to the parent stops every worker and returns 0."""
    config = InferenceConfig.from_env(
        {
            "BULKHEAD_INFERENCE_LISTEN_ADDR": "127.0.0.1:0",
            "BULKHEAD_INFERENCE_WORKERS": "3",
            "BULKHEAD_INFERENCE_REPLICA_ID": "r",
            "BULKHEAD_INFERENCE_METRICS_PORT": "9999",
        }
    )
    seen, procs, addresses = [], [], []

    def ready(proc: subprocess.Popen) -> bool:
        procs.append(proc)
        seen.append(json.loads(proc.stdout.readline()))
        return True

    def on_ready(address: str) -> None:
        addresses.append(address)
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()

    env = {**{k: v for k, v in os.environ.items() if k != WORKER_ENV}, "BULKHEAD_INFERENCE_METRICS_PORT": "9999"}
    command = [sys.executable, "-c", WORKER_SCRIPT, "inference"]
    code = serve_workers(config, command, env=env, ready=ready, on_ready=on_ready, stdout=subprocess.PIPE)
    assert code == 0
    assert [s["BULKHEAD_INFERENCE_WORKER"] for s in seen] == ["1", "2", "3"]
    assert {s["BULKHEAD_INFERENCE_LISTEN_ADDR"] for s in seen} == set(addresses) and not addresses[0].endswith(":0")
    assert [s["BULKHEAD_INFERENCE_REPLICA_ID"] for s in seen] == ["r-w1", "r-w2", "r-w3"]
    assert [s["BULKHEAD_INFERENCE_METRICS_PORT"] for s in seen] == ["9999", "0", "0"]
    assert all(p.poll() is not None for p in procs)


def test_workers_must_be_a_sane_count():
    """0 or absurd worker counts are configuration errors at start."""
    for bad in ("0", "65"):
        with pytest.raises(ValueError):
            InferenceConfig.from_env({"BULKHEAD_INFERENCE_WORKERS": bad})

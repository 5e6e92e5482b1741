"""Worker processes on one port (BULKHEAD_INFERENCE_WORKERS): SO_REUSEPORT only when asked for, every worker serves."""

from __future__ import annotations

import socket

import grpc
import pytest

from bulkhead.inference.v1 import inference_pb2 as pb
from bulkhead.inference.v1 import inference_pb2_grpc
from services.inference.config import InferenceConfig
from services.inference.server import start
from services.inference.workers import serve_workers
from shared import process

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


def test_serve_workers_runs_config_workers_each_with_its_own_journal_replica(monkeypatch):
    """The proxy's workers are shared.process.serve_workers' (tested there), each with an attempt journal replica
    of its own: `<replica>-w<i>`, named after the shared address when no replica id is configured."""
    seen = {}

    def run(service, count, address, command, *, extra_env, metrics_port, **_):
        seen.update(service=service, count=count, address=address, command=command, metrics_port=metrics_port)
        seen["replicas"] = [extra_env(i, "127.0.0.1:4321")["BULKHEAD_INFERENCE_REPLICA_ID"] for i in (1, 2, 3)]
        return 0

    monkeypatch.setattr(process, "serve_workers", run)
    named = {"BULKHEAD_INFERENCE_LISTEN_ADDR": "127.0.0.1:0", "BULKHEAD_INFERENCE_WORKERS": "3"}
    assert serve_workers(InferenceConfig.from_env({**named, "BULKHEAD_INFERENCE_REPLICA_ID": "r"}), ["proxy"]) == 0
    assert seen == {
        "service": "inference",
        "count": 3,
        "address": "127.0.0.1:0",
        "command": ["proxy"],
        "metrics_port": InferenceConfig.from_env(named).service.metrics_port,  # the parent serves the workers' sum
        "replicas": ["r-w1", "r-w2", "r-w3"],
    }
    serve_workers(InferenceConfig.from_env(named), ["proxy"])
    host = socket.gethostname()
    assert seen["replicas"] == [f"{host}:4321-w1", f"{host}:4321-w2", f"{host}:4321-w3"]


def test_workers_must_be_a_sane_count():
    """0 or absurd worker counts are configuration errors at start."""
    for bad in ("0", "65"):
        with pytest.raises(ValueError):
            InferenceConfig.from_env({"BULKHEAD_INFERENCE_WORKERS": bad})

"""serve() and make_channel() speak mTLS whenever BULKHEAD_TLS_* are set, so no service can forget to."""

from __future__ import annotations

import grpc
import pytest

from bulkhead.testing.v1 import echo_pb2, echo_pb2_grpc
from bulkhead_cli.certs import write_dev_certs
from shared.client import make_channel
from shared.server import serve
from testkit.echo import echo_binding
from testkit.tokens import TestTokens


async def test_default_server_and_channel_use_mtls_from_env(tmp_path, monkeypatch):
    """With the three variables set: a default channel gets through, a plaintext one does not."""
    issued = {i.name: i for i in write_dev_certs(tmp_path, names=["state", "orchestrator"])}
    monkeypatch.setenv("BULKHEAD_TLS_CA", str(tmp_path / "ca.pem"))
    monkeypatch.setenv("BULKHEAD_TLS_CERT", str(issued["state"].cert))
    monkeypatch.setenv("BULKHEAD_TLS_KEY", str(issued["state"].key))
    tokens = TestTokens()
    running = await serve(name="state", bindings=[echo_binding()], verifier=tokens.verifier, address="localhost:0")
    try:
        monkeypatch.setenv("BULKHEAD_TLS_CERT", str(issued["orchestrator"].cert))
        monkeypatch.setenv("BULKHEAD_TLS_KEY", str(issued["orchestrator"].key))
        async with make_channel(f"localhost:{running.port}") as channel:
            resp = await echo_pb2_grpc.EchoServiceStub(channel).Echo(
                echo_pb2.EchoRequest(), metadata=tokens.metadata("t_a")
            )
        assert resp.seen.tenant_id == "t_a"
        async with grpc.aio.insecure_channel(f"localhost:{running.port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await echo_pb2_grpc.EchoServiceStub(plain).Echo(
                    echo_pb2.EchoRequest(), metadata=tokens.metadata("t_a"), timeout=5
                )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await running.stop(0)

"""A new channel never inherits another channel's failures: a server on a reused port is reachable at once."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shared.client import make_channel


async def _health_server(port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound


async def _check(channel: grpc.aio.Channel) -> grpc.StatusCode:
    try:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_new_channel_reaches_a_new_server_on_a_port_whose_old_server_died() -> None:
    """A channel still open to a dead server (in backoff after "connection refused") does not make a new
    channel to a new server on the same port fail (gRPC's process-wide subchannel pool would)."""
    old, port = await _health_server()
    stale = make_channel(f"127.0.0.1:{port}", tls=None)
    try:
        assert await _check(stale) == grpc.StatusCode.OK
        await old.stop(0)
        assert await _check(stale) == grpc.StatusCode.UNAVAILABLE  # refused: now in reconnect backoff
        new, _ = await _health_server(port)  # as when the kernel gives the port to the next port-0 bind
        fresh = make_channel(f"127.0.0.1:{port}", tls=None)
        try:
            assert await _check(fresh) == grpc.StatusCode.OK
        finally:
            await fresh.close()
            await new.stop(0)
    finally:
        await stale.close()

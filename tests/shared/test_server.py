"""The server scaffold: connections are recycled, so callers re-resolve and reach new replicas."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared import server as scaffold
from shared.server import serve
from testkit.echo import echo_binding
from testkit.tokens import TestTokens


async def _idle_after_age(options) -> grpc.ChannelConnectivity:
    running = await serve(
        name="echo", bindings=[echo_binding()], verifier=TestTokens().verifier, tls=None, options=options
    )
    channel = grpc.aio.insecure_channel(running.address)
    try:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        await asyncio.sleep(1.5)
        state = channel.get_state()
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING  # the next call just reconnects
        return state
    finally:
        await channel.close()
        await running.stop(0)


async def test_a_connection_older_than_the_max_age_is_sent_away():
    """After max age the server sends GOAWAY: the idle client channel has let its connection go."""
    assert await _idle_after_age([("grpc.max_connection_age_ms", 500)]) != grpc.ChannelConnectivity.READY


async def test_without_the_max_age_the_connection_stays():
    """The control: with no age limit the same channel is still connected."""
    assert await _idle_after_age([("grpc.max_connection_age_ms", 2**31 - 1)]) == grpc.ChannelConnectivity.READY


def test_servers_recycle_connections_within_minutes():
    """The default every service runs with: minutes, not never."""
    assert 60_000 <= scaffold.MAX_CONNECTION_AGE_MS <= 900_000

"""Service-to-service channels forward the caller's identity, and refuse to call without one."""

from __future__ import annotations

import grpc
import pytest

from bulkhead.testing.v1 import echo_pb2, echo_pb2_grpc
from shared.client import NoIdentityToForward, StaticCredentials, make_channel
from shared.server import serve
from shared.tenancy import TenantContext, tenant_scope
from testkit.echo import echo_binding
from testkit.tokens import TestTokens


@pytest.fixture
async def echo():
    tokens = TestTokens()
    running = await serve(name="echo", bindings=[echo_binding()], verifier=tokens.verifier)
    yield running, tokens
    await running.stop(0)


async def test_forwarding_channel_carries_the_current_tenant(echo):
    """Inside tenant A's request, a forwarding channel calls as A with the same request id."""
    running, tokens = echo
    ctx = TenantContext(
        tenant_id="t_a", principal_id="p", scopes=frozenset({"*"}), request_id="req-1", token=tokens.mint("t_a")
    )
    async with make_channel(running.address, forward=True) as channel:
        with tenant_scope(ctx):
            resp = await echo_pb2_grpc.EchoServiceStub(channel).Echo(echo_pb2.EchoRequest())
    assert resp.seen.tenant_id == "t_a" and resp.seen.request_id == "req-1"


async def test_forwarding_channel_refuses_without_a_tenant(echo):
    """Outside any request there is no identity to forward: the call fails loudly, it is not sent bare."""
    running, _ = echo
    async with make_channel(running.address, forward=True) as channel:
        with pytest.raises(NoIdentityToForward):
            await echo_pb2_grpc.EchoServiceStub(channel).Echo(echo_pb2.EchoRequest())


async def test_static_credentials_for_external_callers(echo):
    """The CLI's channel sends a fixed token and tenant."""
    running, tokens = echo
    creds = StaticCredentials(tokens.mint("t_b"), "t_b")
    async with make_channel(running.address, credentials=creds) as channel:
        resp = await echo_pb2_grpc.EchoServiceStub(channel).EchoStream(echo_pb2.EchoStreamRequest(count=2)).read()
    assert resp.seen.tenant_id == "t_b"


async def test_spoofed_tenant_through_static_credentials_is_refused(echo):
    """A client that claims another tenant than its token's is refused by the server."""
    running, tokens = echo
    creds = StaticCredentials(tokens.mint("t_b"), "t_a")
    async with make_channel(running.address, credentials=creds) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await echo_pb2_grpc.EchoServiceStub(channel).Echo(echo_pb2.EchoRequest())
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED

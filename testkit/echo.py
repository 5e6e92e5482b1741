"""A servicer of every RPC shape, to test and benchmark the tenancy interceptors."""

from __future__ import annotations

from bulkhead.testing.v1 import echo_pb2, echo_pb2_grpc
from shared import errors
from shared.server import Binding
from shared.tenancy import current_tenant, require_tenant

_FAILURES = {
    "not_found": lambda: errors.NotFound("no such thing"),
    "invalid": lambda: errors.InvalidArgument("bad field", violations={"message": "must not be empty"}),
    "quota": lambda: errors.ResourceExhausted("over quota", violations=[("tenant:x", "requests/min")], retry_after=1.5),
    "crash": lambda: RuntimeError("boom with detail that must not reach the client"),
}


def _seen() -> echo_pb2.Seen:
    ctx = require_tenant()
    return echo_pb2.Seen(tenant_id=ctx.tenant_id, principal_id=ctx.principal_id, request_id=ctx.request_id)


class EchoServicer(echo_pb2_grpc.EchoServiceServicer):
    """Answers with what the interceptor bound."""

    async def Echo(self, request, context):
        if request.fail_with:
            raise _FAILURES[request.fail_with]()
        return echo_pb2.EchoResponse(message=request.message, seen=_seen())

    async def EchoStream(self, request, context):
        for i in range(request.count):
            yield echo_pb2.EchoStreamResponse(index=i, seen=_seen())

    async def EchoCollect(self, request_iterator, context):
        count = 0
        async for _ in request_iterator:
            count += 1
        return echo_pb2.EchoCollectResponse(count=count, seen=_seen())

    async def EchoChat(self, request_iterator, context):
        async for req in request_iterator:
            yield echo_pb2.EchoChatResponse(message=req.message, seen=_seen())

    async def PublicEcho(self, request, context):
        return echo_pb2.PublicEchoResponse(message=request.message, tenant_bound=current_tenant() is not None)

    async def OperatorEcho(self, request, context):
        return echo_pb2.OperatorEchoResponse(message=request.message)

    async def Unguarded(self, request, context):
        return echo_pb2.UnguardedResponse()


def echo_binding() -> Binding:
    """The echo servicer, ready for shared.server.serve."""
    return Binding(
        echo_pb2_grpc.add_EchoServiceServicer_to_server,
        EchoServicer(),
        echo_pb2.DESCRIPTOR.services_by_name["EchoService"],
    )

"""Caller-side typed errors: a peer's failure decoded from a real grpc.aio server's trailers (RpcFailure), and
the one translation into our own error (peer_call / from_peer) that keeps what our caller needs."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from bulkhead.testing.v1 import echo_pb2, echo_pb2_grpc
from shared import errors
from shared.server import serve
from testkit.echo import EchoServicer, echo_binding
from testkit.tokens import TestTokens

TENANT = "t_alpha"

RAISED = {
    "invalid": errors.InvalidArgument(
        "bad page", reason="INVALID_PAGE_SIZE", violations={"page_size": ">= 0", "name": "empty"}, metadata={"k": "v"}
    ),
    "quota": errors.ResourceExhausted(
        "over quota", violations=[("tenant:x", "requests/min"), ("model:m", "tokens/min")], retry_after=1.5
    ),
    "down": errors.Unavailable("database away", reason="DATABASE_UNAVAILABLE", retry_after=0.25),
    "aborted": errors.Aborted("lost a race", retry_after=0.05),
    "gone": errors.FailedPrecondition("lease expired", reason="LEASE_EXPIRED", metadata={"lease": "l1"}),
    "missing": errors.NotFound("no such secret", reason="SECRET_NOT_FOUND"),
    "exists": errors.AlreadyExists("taken"),
}


def _foreign_status() -> bytes:
    """What a peer outside our catalog sends: its own domain, a reason we do not have."""
    status = status_pb2.Status(code=grpc.StatusCode.FAILED_PRECONDITION.value[0], message="theirs")
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(reason="SOMEONE_ELSES_REASON", domain="other.example", metadata={"x": "y"})
    )
    return status.SerializeToString()


class _Raising(EchoServicer):
    async def Echo(self, request, context):
        if request.fail_with == "foreign":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "theirs",
                trailing_metadata=(("grpc-status-details-bin", _foreign_status()),),
            )
        if request.fail_with == "bare":
            await context.abort(grpc.StatusCode.INTERNAL, "")
        if request.fail_with == "late":
            raise errors.DeadlineExceeded("too slow")
        raise RAISED[request.fail_with]


@pytest.fixture
async def call():
    """call(kind): the AioRpcError a real server's Echo fails with, raising RAISED[kind] through the interceptors."""
    tokens = TestTokens()
    binding = echo_binding()
    running = await serve(
        name="echo",
        bindings=[type(binding)(binding.add_to_server, _Raising(), binding.descriptor)],
        verifier=tokens.verifier,
        tls=None,
    )
    channel = grpc.aio.insecure_channel(running.address)
    stub = echo_pb2_grpc.EchoServiceStub(channel)

    async def failed(kind: str) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Echo(echo_pb2.EchoRequest(fail_with=kind), metadata=tokens.metadata(TENANT))
        return info.value

    try:
        yield failed
    finally:
        await channel.close()
        await running.stop(0)


async def test_every_detail_kind_is_decoded_typed(call):
    """ErrorInfo, BadRequest, QuotaFailure and RetryInfo come back as fields of one frozen value."""
    invalid = errors.RpcFailure.of(await call("invalid"))
    assert (invalid.code, invalid.message, invalid.reason, invalid.domain) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "bad page",
        "INVALID_PAGE_SIZE",
        errors.ERROR_DOMAIN,
    )
    assert dict(invalid.metadata) == {"k": "v"}
    assert invalid.field_violations == (("page_size", ">= 0"), ("name", "empty"))
    assert invalid.quota_violations == () and invalid.retry_after is None

    quota = errors.RpcFailure.of(await call("quota"))
    assert (quota.code, quota.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED")
    assert quota.quota_violations == (("tenant:x", "requests/min"), ("model:m", "tokens/min"))
    assert quota.retry_after == 1.5

    with pytest.raises(AttributeError):  # frozen: a decoded failure is a value
        quota.reason = "OTHER"  # type: ignore[misc]
    with pytest.raises(TypeError):
        invalid.metadata["k"] = "w"  # type: ignore[index]


async def test_a_failure_without_details_still_decodes(call):
    """A bare status (no google.rpc Status in the trailers): the code, its name as message, nothing else."""
    bare = errors.RpcFailure.of(await call("bare"))
    assert (bare.code, bare.message, bare.reason) == (grpc.StatusCode.INTERNAL, "INTERNAL", None)
    assert errors.from_peer(await call("bare")).code == grpc.StatusCode.UNAVAILABLE  # our dependency failed


@pytest.mark.parametrize("kind", sorted(RAISED))
async def test_translation_keeps_code_reason_and_details(call, kind):
    """Our own error from a peer's failure says what the peer said: code, reason, metadata, violations,
    retry delay, so the status we send our caller carries the same google.rpc details."""
    sent = RAISED[kind]
    with pytest.raises(errors.BulkheadError) as info:
        with errors.peer_call():
            raise await call(kind)
    ours = info.value
    assert type(ours) is type(sent) and ours.code == sent.code
    assert (ours.message, ours.reason, ours.metadata) == (sent.message, sent.reason, sent.metadata)
    assert getattr(ours, "violations", None) == getattr(sent, "violations", None)
    assert getattr(ours, "retry_after", None) == getattr(sent, "retry_after", None)
    assert ours.to_status() == sent.to_status()  # byte for byte the reply the peer sent
    assert ours.peer is not None and ours.peer.code == sent.code


async def test_a_peers_deadline_or_internal_failure_is_our_dependency_unavailable(call):
    """Transient for our callers (the orchestrator pauses a run on UNAVAILABLE), the peer's code kept as reason."""
    late = errors.from_peer(await call("late"))
    assert (type(late), late.reason, late.message) == (errors.Unavailable, "DEADLINE_EXCEEDED", "too slow")
    assert late.peer is not None and late.peer.code == grpc.StatusCode.DEADLINE_EXCEEDED
    bare = errors.from_peer(await call("bare"))
    assert (type(bare), bare.reason) == (errors.Unavailable, "INTERNAL")


async def test_retry_after_survives_into_our_reply(call):
    """RESOURCE_EXHAUSTED, UNAVAILABLE and ABORTED keep RetryInfo; UNAVAILABLE also keeps gRPC's pushback."""
    for kind, seconds in (("quota", 1.5), ("down", 0.25), ("aborted", 0.05)):
        ours = errors.from_peer(await call(kind))
        retry = [d for d in ours.details() if isinstance(d, error_details_pb2.RetryInfo)]
        assert [r.retry_delay.ToNanoseconds() / 1e9 for r in retry] == [seconds], kind
    pushback = dict(errors.trailing_metadata(errors.from_peer(await call("down"))))
    assert pushback["grpc-retry-pushback-ms"] == "250"


async def test_a_foreign_reason_is_not_repeated(call):
    """A reason outside our catalog (another domain's) is decoded as sent but never put in our reply:
    our error carries the class default and none of the foreign metadata."""
    failure = errors.RpcFailure.of(await call("foreign"))
    assert (failure.reason, failure.domain, dict(failure.metadata)) == (
        "SOMEONE_ELSES_REASON",
        "other.example",
        {"x": "y"},
    )
    ours = failure.to_error()
    assert isinstance(ours, errors.FailedPrecondition)
    assert (ours.reason, ours.metadata, ours.message) == ("FAILED_PRECONDITION", {}, "theirs")
    assert b"SOMEONE_ELSES" not in ours.to_status().SerializeToString()


def test_a_catalog_reason_from_another_domain_is_not_ours():
    """Same name, other domain: not our reason (the code's name stands in)."""
    failure = errors.RpcFailure(grpc.StatusCode.NOT_FOUND, "x", reason="SECRET_NOT_FOUND", domain="other.example")
    assert failure.to_error().reason == "NOT_FOUND"


async def test_error_details_is_the_dict_view_of_the_typed_failure(call):
    """error_details() (tests use it) stays the same dict, now built from RpcFailure."""
    assert errors.error_details(await call("quota")) == {
        "reason": "QUOTA_EXCEEDED",
        "domain": errors.ERROR_DOMAIN,
        "metadata": {},
        "bad_request": {},
        "quota": [("tenant:x", "requests/min"), ("model:m", "tokens/min")],
        "retry_after": 1.5,
    }

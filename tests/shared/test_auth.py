"""The tenancy server interceptor: every rule, for unary and streaming RPCs."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from bulkhead.testing.v1 import echo_pb2, echo_pb2_grpc
from shared.errors import error_details
from shared.server import serve
from shared.tenancy import PLATFORM_TENANT
from testkit.echo import echo_binding
from testkit.tokens import TestTokens

A, B = "t_alpha", "t_beta"


@pytest.fixture
def tokens():
    return TestTokens()


@pytest.fixture
async def echo(tokens):
    running = await serve(name="echo", bindings=[echo_binding()], verifier=tokens.verifier)
    channel = grpc.aio.insecure_channel(running.address)
    yield running, echo_pb2_grpc.EchoServiceStub(channel)
    await channel.close()
    await running.stop(0)


async def _status(call_coro):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call_coro
    return info.value


async def _drain(stream):
    return [item async for item in stream]


def _calls(stub, md, *, messages: int = 1):
    """One call of each RPC shape with metadata md, as awaitables.

    Calls that expect a refusal send no request messages: grpc.aio reports a client write that
    loses the race with the server's early status as INTERNAL instead of that status
    (grpc/grpc#36066), which made these tests flaky without saying anything about the interceptor.
    """

    async def collect():
        async def gen():
            for _ in range(messages):
                yield echo_pb2.EchoCollectRequest(message="x")

        return await stub.EchoCollect(gen(), metadata=md)

    async def chat():
        async def gen():
            for _ in range(messages):
                yield echo_pb2.EchoChatRequest(message="x")

        return await _drain(stub.EchoChat(gen(), metadata=md))

    return {
        "unary": lambda: stub.Echo(echo_pb2.EchoRequest(message="hi"), metadata=md),
        "server_stream": lambda: _drain(stub.EchoStream(echo_pb2.EchoStreamRequest(count=2), metadata=md)),
        "client_stream": collect,
        "bidi": chat,
    }


SHAPES = ["unary", "server_stream", "client_stream", "bidi"]


@pytest.mark.parametrize("shape", SHAPES)
async def test_valid_token_binds_tenant_in_every_shape(echo, tokens, shape):
    """A valid token for the named tenant reaches the handler with that tenant bound."""
    _, stub = echo
    result = await _calls(stub, tokens.metadata(A, principal_id="p_alice"))[shape]()
    items = result if isinstance(result, list) else [result]
    assert items and all(i.seen.tenant_id == A and i.seen.principal_id == "p_alice" for i in items)


@pytest.mark.parametrize("shape", SHAPES)
async def test_missing_token_is_unauthenticated(echo, shape):
    """No authorization header: UNAUTHENTICATED, before the handler runs."""
    _, stub = echo
    err = await _status(_calls(stub, (("x-tenant-id", A),), messages=0)[shape]())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_details(err)["reason"] == "MISSING_TOKEN"


@pytest.mark.parametrize("shape", SHAPES)
async def test_missing_tenant_is_unauthenticated(echo, tokens, shape):
    """A token but no x-tenant-id: UNAUTHENTICATED."""
    _, stub = echo
    md = (("authorization", f"Bearer {tokens.mint(A)}"),)
    err = await _status(_calls(stub, md, messages=0)[shape]())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_details(err)["reason"] == "MISSING_TENANT"


@pytest.mark.parametrize("shape", SHAPES)
async def test_spoofed_tenant_is_permission_denied(echo, tokens, shape):
    """Tenant A's token with x-tenant-id of B: PERMISSION_DENIED, and B is not named back."""
    _, stub = echo
    md = (("authorization", f"Bearer {tokens.mint(A)}"), ("x-tenant-id", B))
    err = await _status(_calls(stub, md, messages=0)[shape]())
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_details(err)["reason"] == "TENANT_MISMATCH"
    assert B not in err.details()


def _repeated(tokens, key: str, first: str, second: str) -> tuple[tuple[str, str], ...]:
    """Metadata for tenant A's call in which key arrives twice: first, then second."""
    values = {"authorization": lambda t: f"Bearer {tokens.mint(t)}", "x-tenant-id": lambda t: t}[key]
    other = {"authorization": ("x-tenant-id", A), "x-tenant-id": ("authorization", f"Bearer {tokens.mint(A)}")}[key]
    return (other, (key, values(first)), (key, values(second)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("key", ["authorization", "x-tenant-id"])
@pytest.mark.parametrize("order", [(A, B), (B, A), (A, A)], ids=["A-then-B", "B-then-A", "A-twice"])
async def test_repeated_identity_metadata_is_refused(echo, tokens, shape, key, order):
    """Two authorization or x-tenant-id values, in either order or even equal: refused, never picked by position."""
    _, stub = echo
    err = await _status(_calls(stub, _repeated(tokens, key, *order), messages=0)[shape]())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    details = error_details(err)
    assert details["reason"] == "AMBIGUOUS_METADATA" and details["metadata"]["keys"] == key


@pytest.mark.parametrize("key", ["authorization", "x-tenant-id"])
async def test_repeated_identity_metadata_is_a_security_event(echo, tokens, key):
    """The refusal is counted like any other denial (an attacker probing gateways shows up)."""
    running, stub = echo
    await _status(stub.Echo(echo_pb2.EchoRequest(), metadata=_repeated(tokens, key, A, B)))
    assert running.security_events.counts[("unauthenticated", "AMBIGUOUS_METADATA")] == 1


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("key", ["x-request-id", "x-agent-id", "x-run-id"])
@pytest.mark.parametrize("values", [("r-1", "r-2"), ("r-1", "r-1")], ids=["different", "equal"])
async def test_repeated_request_tags_are_refused(echo, tokens, shape, key, values):
    """Two x-request-id (idempotency keys derive from it), x-agent-id or x-run-id values: refused, not last-wins."""
    _, stub = echo
    md = (*tokens.metadata(A), *((key, v) for v in values))
    err = await _status(_calls(stub, md, messages=0)[shape]())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    details = error_details(err)
    assert details["reason"] == "AMBIGUOUS_METADATA" and details["metadata"]["keys"] == key


def _hpack_literal(name: str, value: str) -> bytes:
    """One header as HPACK "literal without indexing, new name", no Huffman (RFC 7541 6.2.2)."""

    def length(raw: bytes) -> bytes:
        if len(raw) < 127:
            return bytes([len(raw)])
        out, rest = bytearray([127]), len(raw) - 127
        while rest >= 128:
            out.append(rest & 0x7F | 0x80)
            rest >>= 7
        return bytes(out + bytes([rest]))

    n, v = name.encode(), value.encode()
    return b"\x00" + length(n) + n + length(v) + v


async def _raw_echo(address: str, headers: list[tuple[str, str]]) -> list[int]:
    """One Echo call over hand-written HTTP/2, header names exactly as given (grpc clients refuse
    other spellings; a raw client need not); the frame types the server answered with."""

    def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload

    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    block = b"".join(
        _hpack_literal(k, v)
        for k, v in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/bulkhead.testing.v1.EchoService/Echo"),
            (":authority", "echo"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *headers,
        ]
    )
    writer.write(
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + frame(4, 0, 0, b"")
        + frame(1, 0x4, 1, block)
        + frame(
            0, 0x1, 1, b"\x00" + len(b := echo_pb2.EchoRequest(message="x").SerializeToString()).to_bytes(4, "big") + b
        )
    )
    kinds: list[int] = []
    try:
        while True:  # until the stream ends: trailers (HEADERS with END_STREAM) or RST_STREAM
            head = await asyncio.wait_for(reader.readexactly(9), 5)
            size, kind, flags, stream = int.from_bytes(head[:3], "big"), head[3], head[4], head[5:]
            await reader.readexactly(size)
            if stream != bytes(4):
                kinds.append(kind)
                if kind == 3 or (kind == 1 and flags & 0x1):
                    return kinds
    finally:
        writer.close()


_DATA = 0


@pytest.mark.parametrize(
    "spelled",
    [
        [("Authorization", "A")],
        [("authorization ", "A")],
        [(" authorization", "A")],
        [("authorization", "A"), ("Authorization", "B")],
        [("authorization", "A"), ("X-Tenant-Id", "")],
        [("authorization", "A"), ("x-tenant-id ", "")],
    ],
    ids=lambda s: "+".join(repr(k) for k, _ in s),
)
async def test_header_spellings_from_raw_http2_are_never_answered(echo, tokens, spelled):
    """gRPC hands "Authorization" or "x-tenant-id " from a raw HTTP/2 client to the interceptor as
    sent, then fails the call itself (INTERNAL "Illegal header key"): no handler ever answers it."""
    running, _ = echo
    bearer = {"A": f"Bearer {tokens.mint(A)}", "B": f"Bearer {tokens.mint(B)}"}
    headers = [(k, bearer[v] if k.strip().lower() == "authorization" else A) for k, v in spelled]
    if not any(k == "x-tenant-id" for k, _ in headers):
        headers.append(("x-tenant-id", A))
    kinds = await _raw_echo(running.address, headers)
    assert kinds and _DATA not in kinds


@pytest.mark.parametrize(
    "keys",
    [
        ("Authorization", "x-tenant-id"),
        (" authorization", "x-tenant-id"),
        ("authorization", "AUTHORIZATION", "x-tenant-id"),
        ("authorization", "X-Tenant-Id"),
    ],
    ids="+".join,
)
async def test_interceptor_refuses_other_spellings_itself(tokens, keys):
    """Should gRPC ever pass such a call on, the interceptor's own verdict is already a refusal."""
    from shared.auth import Denial, TenancyInterceptor, _metadata_dict
    from shared.scopes import MethodRule

    value = {"authorization": f"Bearer {tokens.mint(A)}", "x-tenant-id": A}
    md = tuple((k, value[k.strip().lower()]) for k in keys)
    interceptor = TenancyInterceptor(tokens.verifier, service="echo")
    with pytest.raises(Denial) as info:
        await interceptor._authenticate(MethodRule(scope="testing.echo", public=False), *_metadata_dict(md))
    assert info.value.error.reason == "AMBIGUOUS_METADATA"


async def test_raw_http2_call_with_canonical_headers_is_answered(echo, tokens):
    """The raw client itself works: with lower-case names once each, the call is answered."""
    running, _ = echo
    kinds = await _raw_echo(running.address, [("authorization", f"Bearer {tokens.mint(A)}"), ("x-tenant-id", A)])
    assert _DATA in kinds and not running.security_events.counts


async def test_public_method_ignores_repeated_identity_metadata(echo, tokens):
    """Public methods read no identity, so there is nothing ambiguous to refuse."""
    _, stub = echo
    resp = await stub.PublicEcho(
        echo_pb2.PublicEchoRequest(message="hi"), metadata=_repeated(tokens, "x-tenant-id", A, B)
    )
    assert resp.message == "hi" and not resp.tenant_bound


@pytest.mark.parametrize("shape", SHAPES)
async def test_missing_scope_is_permission_denied(echo, tokens, shape):
    """A token without the scope the proto declares: PERMISSION_DENIED naming the scope."""
    _, stub = echo
    err = await _status(_calls(stub, tokens.metadata(A, scopes=("state.*",)), messages=0)[shape]())
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    details = error_details(err)
    assert details["reason"] == "MISSING_SCOPE" and details["metadata"]["scope"] == "testing.echo"


@pytest.mark.parametrize("shape", SHAPES)
async def test_expired_token_says_expired(echo, tokens, shape):
    """An expired token: UNAUTHENTICATED with a message that says so."""
    _, stub = echo
    token, _ = tokens.issuer.issue(tenant_id=A, principal_id="p", scopes={"*"}, ttl=60, now=time.time() - 3600)
    err = await _status(_calls(stub, (("authorization", f"Bearer {token}"), ("x-tenant-id", A)), messages=0)[shape]())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in err.details()
    assert error_details(err)["reason"] == "TOKEN_EXPIRED"


async def test_forged_signature_is_unauthenticated(echo, tokens):
    """A token signed by a key identity never published is refused."""
    _, stub = echo
    forged = TestTokens().mint(A)
    err = await _status(
        stub.Echo(echo_pb2.EchoRequest(), metadata=(("authorization", f"Bearer {forged}"), ("x-tenant-id", A)))
    )
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_details(err)["reason"] == "TOKEN_UNKNOWN_KEY"


async def test_garbage_token_is_unauthenticated(echo):
    """A bearer value that is not a JWT is refused as malformed."""
    _, stub = echo
    err = await _status(
        stub.Echo(echo_pb2.EchoRequest(), metadata=(("authorization", "Bearer nonsense"), ("x-tenant-id", A)))
    )
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_details(err)["reason"] == "TOKEN_MALFORMED"


async def test_revoked_token_refused_even_when_cached(echo, tokens):
    """Revocation takes effect on a token the verifier has already cached."""
    _, stub = echo
    token, claims = tokens.issuer.issue(tenant_id=A, principal_id="p", scopes={"*"})
    md = (("authorization", f"Bearer {token}"), ("x-tenant-id", A))
    assert (await stub.Echo(echo_pb2.EchoRequest(), metadata=md)).seen.tenant_id == A
    tokens.revoke(claims.jti)
    err = await _status(stub.Echo(echo_pb2.EchoRequest(), metadata=md))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in err.details()


async def test_method_without_rule_is_refused(echo, tokens):
    """A method that declares no AuthRule is refused even with an all-powerful token (fail closed)."""
    _, stub = echo
    err = await _status(stub.Unguarded(echo_pb2.UnguardedRequest(), metadata=tokens.metadata(A)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_details(err)["reason"] == "NO_AUTH_RULE"


async def test_public_method_needs_no_token_and_binds_no_tenant(echo):
    """Public methods answer without a token and never see a tenant."""
    _, stub = echo
    resp = await stub.PublicEcho(echo_pb2.PublicEchoRequest(message="hi"))
    assert resp.message == "hi" and not resp.tenant_bound


async def test_wildcard_scope_never_grants_platform_operator(echo, tokens):
    """'*' in an ordinary tenant's token does not reach operator-only methods."""
    _, stub = echo
    err = await _status(stub.OperatorEcho(echo_pb2.OperatorEchoRequest(), metadata=tokens.metadata(A)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_operator_scope_outside_platform_tenant_is_refused(echo, tokens):
    """platform.operator minted into a customer tenant's token is still refused."""
    _, stub = echo
    err = await _status(
        stub.OperatorEcho(echo_pb2.OperatorEchoRequest(), metadata=tokens.metadata(A, scopes=("platform.operator",)))
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_platform_operator_reaches_operator_method(echo, tokens):
    """The platform tenant with the operator scope is let through."""
    _, stub = echo
    resp = await stub.OperatorEcho(
        echo_pb2.OperatorEchoRequest(message="ok"),
        metadata=tokens.metadata(PLATFORM_TENANT, scopes=("platform.operator",)),
    )
    assert resp.message == "ok"


async def test_domain_errors_become_rich_statuses(echo, tokens):
    """Handlers raise domain errors; callers get the status code and google.rpc details."""
    _, stub = echo
    md = tokens.metadata(A)
    err = await _status(stub.Echo(echo_pb2.EchoRequest(fail_with="invalid"), metadata=md))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(err)["bad_request"] == {"message": "must not be empty"}
    err = await _status(stub.Echo(echo_pb2.EchoRequest(fail_with="quota"), metadata=md))
    details = error_details(err)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details["quota"] == [("tenant:x", "requests/min")] and details["retry_after"] == 1.5
    err = await _status(stub.Echo(echo_pb2.EchoRequest(fail_with="not_found"), metadata=md))
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_unexpected_error_is_internal_without_detail(echo, tokens):
    """A crash reaches the caller as INTERNAL with a request id, never the exception's text."""
    _, stub = echo
    md = (*tokens.metadata(A), ("x-request-id", "req-123"))
    err = await _status(stub.Echo(echo_pb2.EchoRequest(fail_with="crash"), metadata=md))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "req-123" in err.details() and "boom" not in err.details()


async def test_request_id_is_propagated_or_made(echo, tokens):
    """x-request-id reaches the handler; one is made when the caller sends none."""
    _, stub = echo
    given = await stub.Echo(echo_pb2.EchoRequest(), metadata=(*tokens.metadata(A), ("x-request-id", "r-1")))
    made = await stub.Echo(echo_pb2.EchoRequest(), metadata=tokens.metadata(A))
    assert given.seen.request_id == "r-1" and len(made.seen.request_id) == 32


async def test_denials_are_counted_per_tenant_and_reason(echo, tokens, caplog):
    """Each refusal is a security event: counted by the token's tenant and reason, logged without the token."""
    running, stub = echo
    token = tokens.mint(A)
    for _ in range(3):
        await _status(
            stub.Echo(echo_pb2.EchoRequest(), metadata=(("authorization", f"Bearer {token}"), ("x-tenant-id", B)))
        )
    assert running.security_events.counts[(A, "TENANT_MISMATCH")] == 3
    records = [r for r in caplog.records if getattr(r, "event", "") == "security.denied"]
    assert len(records) >= 3 and records[-1].method == "/bulkhead.testing.v1.EchoService/Echo"
    assert records[-1].claimed_tenant == B and records[-1].peer
    assert all(token not in r.getMessage() and token not in str(r.__dict__) for r in records)


async def test_health_is_open(echo):
    """Health checks answer without a token (load balancers and probes have none)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    running, _ = echo
    async with grpc.aio.insecure_channel(running.address) as channel:
        resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert resp.status == health_pb2.HealthCheckResponse.SERVING

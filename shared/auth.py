"""The server interceptor every service runs: no verified tenant, no answer.

It verifies the bearer token, requires x-tenant-id to equal the token's tenant, checks the
scope the method declares in its proto, then runs the handler with the TenantContext bound
and turns the domain errors the handler raises into precise statuses.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Mapping
from types import MappingProxyType

import grpc
from google.protobuf.message import Message
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared import errors, paging
from shared.bounds import number_violations
from shared.metrics import LATENCY, count_request, tenant_label
from shared.scopes import MethodRule, RuleBook
from shared.security import EXPIRED_ATTRIBUTED_S, SecurityEvents
from shared.tenancy import PLATFORM_TENANT, TenantContext, scope_matches, set_tenant
from shared.tokens import TokenVerifier

log = logging.getLogger("bulkhead.rpc")
_tracer = trace.get_tracer("bulkhead.rpc")

_BEARER = "bearer "


class Denial(Exception):
    """Why a request is refused before its handler runs."""

    def __init__(self, error: errors.BulkheadError, *, tenant_id: str | None = None, principal_id: str | None = None):
        super().__init__(error.message)
        self.error = error
        self.tenant_id = tenant_id
        self.principal_id = principal_id


class TenancyInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates, authorizes and binds the tenant of every RPC; maps domain errors to statuses."""

    def __init__(
        self,
        verifier: TokenVerifier,
        *,
        service: str,
        rules: RuleBook | None = None,
        events: SecurityEvents | None = None,
    ):
        self._verifier = verifier
        self._service = service
        self._rules = rules or RuleBook()
        self.events = events or SecurityEvents(service, suspended=getattr(verifier, "tenant_suspended", None))
        self.page_key: bytes | None = None
        """The service's page-token key (shared.settings.load_page_key), bound for every call; None until
        set, then tokens hold only within this process."""
        self._methods: dict[str, _Method] = {}
        """Method path -> what every call of it shares; registered methods only (others never get here)."""

    def _method(self, path: str) -> _Method:
        m = self._methods.get(path)
        if m is None:
            m = self._methods[path] = _Method(self._service, path, self._rules.rule(path))
        return m

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        m = self._method(details.method)
        metadata, unclear = _metadata_dict(details.invocation_metadata)
        try:
            ctx = await self._authenticate(m.rule, metadata, unclear)
        except Denial as denial:
            return self._deny(handler, denial, m, metadata)
        parent = extract(metadata)  # W3C traceparent from the caller: this call joins its trace
        page_key = self.page_key
        return _wrap(handler, lambda behavior, kind: _bind(behavior, kind, ctx, m, parent, page_key))

    async def _authenticate(
        self, rule: MethodRule | None, md: dict[str, str], unclear: frozenset[str] = frozenset()
    ) -> TenantContext | None:
        if rule is None:
            raise Denial(
                errors.PermissionDenied(
                    "this method declares no authorization rule and is refused", reason="NO_AUTH_RULE"
                )
            )
        if rule.public:
            return None
        ambiguous = sorted(unclear & _IDENTITY_KEYS) if unclear else None
        if ambiguous:
            # A proxy that reads the first value (or only the canonical spelling) and a service that
            # reads the last would disagree about who is calling: refuse instead of picking one.
            raise Denial(
                errors.Unauthenticated(
                    f"metadata {', '.join(ambiguous)} must be sent once, in lower case",
                    reason="AMBIGUOUS_METADATA",
                    metadata={"keys": ",".join(ambiguous)},
                )
            )
        auth = md.get("authorization", "")
        if not auth:
            raise Denial(
                errors.Unauthenticated(
                    "missing bearer token: send 'authorization: Bearer <token>'", reason="MISSING_TOKEN"
                )
            )
        if not auth[: len(_BEARER)].lower() == _BEARER:
            raise Denial(errors.Unauthenticated("authorization must be 'Bearer <token>'", reason="TOKEN_MALFORMED"))
        tenant_id = md.get("x-tenant-id", "")
        if not tenant_id:
            raise Denial(errors.Unauthenticated("missing x-tenant-id metadata", reason="MISSING_TENANT"))
        token = auth[len(_BEARER) :].strip()
        try:
            claims = await self._verifier.verify(token)
        except (errors.Unauthenticated, errors.Unavailable, errors.PermissionDenied) as exc:  # TENANT_SUSPENDED
            owner = _genuine_owner(exc)
            raise Denial(exc, tenant_id=owner and owner.tenant_id, principal_id=owner and owner.principal_id) from None
        if claims.tenant_id != tenant_id:
            raise Denial(
                errors.PermissionDenied("x-tenant-id does not match the token's tenant", reason="TENANT_MISMATCH"),
                tenant_id=claims.tenant_id,
                principal_id=claims.principal_id,
            )
        if not any(scope_matches(g, rule.scope) for g in claims.scopes) or (
            rule.scope.startswith("platform.") and claims.tenant_id != PLATFORM_TENANT
        ):
            raise Denial(
                errors.PermissionDenied(
                    f"token lacks the scope {rule.scope!r} this method needs",
                    reason="MISSING_SCOPE",
                    metadata={"scope": rule.scope},
                ),
                tenant_id=claims.tenant_id,
                principal_id=claims.principal_id,
            )
        return TenantContext(
            tenant_id=claims.tenant_id,
            principal_id=claims.principal_id,
            scopes=claims.scopes,
            tier=claims.tier,
            request_id=md.get("x-request-id") or _new_request_id(),
            token=token,
            actor_id=claims.actor_id,
            agent_id=claims.agent_id or md.get("x-agent-id") or None,
            run_id=claims.run_id or md.get("x-run-id") or None,
        )

    def _deny(self, handler, denial: Denial, m: _Method, md: dict[str, str]):
        error = denial.error
        method = m.path

        def record(context) -> None:  # inside the handler: only the servicer context knows the peer
            self.events.denied(
                reason=error.reason,
                method=method,
                peer=context.peer() or "",
                tenant_id=denial.tenant_id,
                principal_id=denial.principal_id,
                claimed_tenant=md.get("x-tenant-id"),
                message=error.message,
            )
            count_request(self._service, method, tenant_label(denial.tenant_id or "unauthenticated"), error.code.name)

        parent = extract(md)

        async def abort(request_or_iterator, context):
            with _server_span(m, parent) as span:
                record(context)
                _finish_span(span, error.code)
                await context.abort(error.code, error.message, errors.trailing_metadata(error))

        async def abort_stream(request_or_iterator, context):
            with _server_span(m, parent) as span:
                record(context)
                _finish_span(span, error.code)
                await context.abort(error.code, error.message, errors.trailing_metadata(error))
            yield  # pragma: no cover - makes this an async generator for streaming handlers

        return _wrap(handler, lambda behavior, kind: abort_stream if kind.endswith("stream") else abort)


class _Method:
    """What every call of one method shares, worked out on its first call: its rule, span name and the span
    attributes known before the call starts (the attribute names are OpenTelemetry's), its latency child."""

    __slots__ = ("attributes", "latency", "path", "rule", "service")

    def __init__(self, service: str, path: str, rule: MethodRule | None):
        rpc_service, _, rpc_method = path.lstrip("/").partition("/")
        self.service = service
        self.path = path
        self.rule = rule
        self.attributes = MappingProxyType({"rpc.system": "grpc", "rpc.service": rpc_service, "rpc.method": rpc_method})
        self.latency = LATENCY.labels(service, path)


def _new_request_id() -> str:
    """uuid.uuid4().hex, without building a UUID: 32 random hex digits with the version-4 and variant bits."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    return b.hex()


def _genuine_owner(exc: Exception):
    """The claims of a refused token whose signature verified (revoked, suspended, recently expired), else
    None: only then is the refusal that tenant's security event (shared.security)."""
    claims = getattr(exc, "verified_claims", None)
    if claims is None:
        return None
    if getattr(exc, "reason", "") == "TOKEN_EXPIRED" and claims.issued_at < time.time() - EXPIRED_ATTRIBUTED_S:
        return None
    return claims


# Metadata that says who is calling, or which request this is (idempotency keys derive from
# x-request-id; agent and run tags reach metering): each must arrive at most once, since a gateway
# reading the first value and a service reading the last would disagree about it.
_IDENTITY_KEYS = frozenset({"authorization", "x-tenant-id", "x-request-id", "x-agent-id", "x-run-id"})


def _metadata_dict(md) -> tuple[dict[str, str], frozenset[str]]:
    """The call's text metadata by key, and the keys that arrived more than once or misspelled.

    gRPC hands interceptors header names as a raw HTTP/2 client sent them ("Authorization",
    "x-tenant-id "), and today fails such calls itself afterwards ("Illegal header key"). A gateway
    that normalizes names would read them as the canonical key, so our verdict does not rely on
    that: keys are compared stripped and lower-cased, and another spelling is ambiguous too.
    """
    out: dict[str, str] = {}
    ambiguous: set[str] = set()
    for raw, value in md or ():
        if isinstance(value, str):
            key = raw.strip().lower()
            if key in out or key != raw:
                ambiguous.add(key)
            out[key] = value
    return out, frozenset(ambiguous)


_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
_FACTORIES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def _wrap(handler, make):
    """A copy of handler whose behavior is make(original behavior, kind)."""
    for kind in _KINDS:
        behavior = getattr(handler, kind)
        if behavior is not None:
            return _FACTORIES[kind](
                make(behavior, kind),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


def _server_span(m: _Method, parent):
    """The SERVER span of a refused call, child of the caller's span, current while the refusal is recorded
    and ended after."""
    return trace.use_span(
        _start_span(m, parent, None), end_on_exit=True, record_exception=False, set_status_on_exception=False
    )


def _start_span(m: _Method, parent, ctx: TenantContext | None):
    """The SERVER span of an admitted call, child of the caller's span, with the tenant's attributes from the
    start; the caller makes it current and ends it."""
    attributes: Mapping[str, str] = m.attributes
    if ctx is not None:
        attributes = {**attributes, "tenant.id": ctx.tenant_id, "bulkhead.request_id": ctx.request_id}
    return _tracer.start_span(
        m.path,
        context=parent,
        kind=SpanKind.SERVER,
        record_exception=False,
        set_status_on_exception=False,
        attributes=attributes,
    )


def _finish_span(span, code: grpc.StatusCode) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))


def _enter(ctx: TenantContext | None, method: str, page_key: bytes | None) -> str:
    """Bind the call's tenant and page key; the tenant's metric label."""
    set_tenant(ctx)
    paging.bind(method, page_key)
    return tenant_label(ctx.tenant_id) if ctx else "public"


def _done(span, m: _Method, tenant: str, started: float, code: grpc.StatusCode) -> None:
    _finish_span(span, code)
    count_request(m.service, m.path, tenant, code.name)
    m.latency.observe(time.perf_counter() - started)


async def _fail(exc: BaseException, context, method: str, ctx: TenantContext | None) -> None:
    """Answer a handler's error with its status: a domain error's own, else INTERNAL with only the request id."""
    if isinstance(exc, grpc.aio.AbortError):  # the handler aborted on purpose: keep its status
        raise exc
    if isinstance(exc, errors.BulkheadError):
        await context.abort(exc.code, exc.message, errors.trailing_metadata(exc))
    log.exception("unhandled error in %s", method)
    rid = ctx.request_id if ctx else ""
    internal = errors.BulkheadError(f"internal error; quote request id {rid or 'n/a'} when reporting it")
    await context.abort(grpc.StatusCode.INTERNAL, internal.message, errors.trailing_metadata(internal))


def _bind(behavior, kind: str, ctx: TenantContext | None, m: _Method, parent, page_key: bytes | None = None):
    """Run behavior in its server span with the tenant bound; translate domain errors; count and time the call.

    The span is made current and ended as tracer.start_as_current_span would (attach; detach, then end), without
    its context-manager layers: this runs on every call.
    """
    method = m.path

    if not kind.endswith("stream"):

        async def unary_response(request, context):
            span = _start_span(m, parent, ctx)
            try:
                token = otel_context.attach(trace.set_span_in_context(span))
                try:
                    tenant, started, code = _enter(ctx, method, page_key), time.perf_counter(), grpc.StatusCode.OK
                    try:
                        _check_numbers(request)
                        return await behavior(request, context)
                    except Exception as exc:  # noqa: BLE001 - _fail() answers every error with a status, redacted
                        code = exc.code if isinstance(exc, errors.BulkheadError) else _aborted_code(context)
                        await _fail(exc, context, method, ctx)
                    finally:
                        _done(span, m, tenant, started, code)
                finally:
                    otel_context.detach(token)
            finally:
                span.end()

        return unary_response

    async def stream_response(request, context):
        span = _start_span(m, parent, ctx)
        try:
            token = otel_context.attach(trace.set_span_in_context(span))
            try:
                tenant, started, code = _enter(ctx, method, page_key), time.perf_counter(), grpc.StatusCode.OK
                try:
                    _check_numbers(request)
                    result = behavior(request, context)
                    if inspect.isasyncgen(result):
                        async for item in result:
                            yield item
                    else:
                        await result
                except Exception as exc:  # noqa: BLE001 - _fail() answers every error with a status, redacted
                    code = exc.code if isinstance(exc, errors.BulkheadError) else _aborted_code(context)
                    await _fail(exc, context, method, ctx)
                finally:
                    _done(span, m, tenant, started, code)
            finally:
                otel_context.detach(token)
        finally:
            span.end()

    return stream_response


def _check_numbers(request) -> None:
    """Refuse integers no ledger can sum and JSON numbers JSON cannot hold (see shared.bounds) before any
    handler sees them."""
    if isinstance(request, Message):
        problems = number_violations(request)
        if problems:
            raise errors.InvalidArgument(
                f"number out of range in {', '.join(sorted(problems))}",
                reason="VALUE_OUT_OF_RANGE",
                violations=problems,
            )


def _aborted_code(context) -> grpc.StatusCode:
    code = context.code() if hasattr(context, "code") else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.INTERNAL

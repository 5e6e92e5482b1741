"""Channels to other services, with identity forwarded (service to service) or fixed (CLI, clients).

Every channel spreads calls over all of a service's replicas (round_robin) and resends the calls the
protos mark idempotent when a replica dies (shared/service_config.py): callers hold no retry loops.
"""

from __future__ import annotations

import functools
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import cast

import grpc

from shared import telemetry
from shared.db.replica import LSN_HEADER, format_lsn, lsn_from
from shared.service_config import channel_options, channel_target
from shared.tenancy import current_tenant
from shared.tls import TLS_FROM_ENV, TlsConfig, channel_credentials


class NoIdentityToForward(RuntimeError):
    """A forwarding channel was used outside any tenant's request: refuse rather than call anonymously."""


def _with_metadata(details, extra: tuple[tuple[str, str], ...]):
    existing = tuple(details.metadata or ())
    keys = {k for k, _ in extra}
    merged = grpc.aio.Metadata(*(kv for kv in existing if kv[0] not in keys), *extra)
    return details._replace(metadata=merged)


class MetadataSource:
    """Supplies the metadata added to every call; `interceptors()` applies it to all four call shapes."""

    def metadata(self) -> tuple[tuple[str, str], ...]:
        raise NotImplementedError

    async def call_details(self, details):
        """details with this source's metadata merged in (async so subclasses may refresh tokens)."""
        return _with_metadata(details, self.metadata())

    def interceptors(self) -> list:
        """One interceptor per call shape: grpc.aio files an interceptor under the first shape it implements only."""
        return [_UnaryUnary(self), *self.stream_interceptors()]

    def stream_interceptors(self) -> list:
        """The interceptors of the three streaming shapes (make_channel folds the unary one into _MeshUnary)."""
        return [_UnaryStream(self), _StreamUnary(self), _StreamStream(self)]


class _Adapter:
    def __init__(self, source: MetadataSource):
        self.source = source


class _UnaryUnary(_Adapter, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(await self.source.call_details(details), request)


class _UnaryStream(_Adapter, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(await self.source.call_details(details), request)


class _StreamUnary(_Adapter, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(await self.source.call_details(details), request_iterator)


class _StreamStream(_Adapter, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(await self.source.call_details(details), request_iterator)


class ForwardIdentity(MetadataSource):
    """Forwards the current request's token, tenant, request id and tags (trace context: OpenTelemetry)."""

    def metadata(self) -> tuple[tuple[str, str], ...]:
        ctx = current_tenant()
        if ctx is None or not ctx.token:
            raise NoIdentityToForward("no tenant identity to forward: call inside a tenant's request")
        return ctx.as_metadata()


@dataclass
class StaticCredentials(MetadataSource):
    """A fixed token and tenant, for the CLI and external clients (swap `token` to refresh)."""

    token: str
    tenant_id: str
    extra: tuple[tuple[str, str], ...] = field(default=())

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (
            ("authorization", f"Bearer {self.token}"),
            ("x-tenant-id", self.tenant_id),
            ("x-request-id", uuid.uuid4().hex),
            *self.extra,
        )


class ReadYourWrites:
    """Read-your-writes against a service that reads on a replica (docs/CONTRACT.md): remembers the
    highest WAL position (`x-bulkhead-lsn`) each tenant's calls were answered with on this channel,
    and sends it on that tenant's later calls, so a read never shows less than the tenant wrote."""

    def __init__(self, max_tenants: int = 10_000) -> None:
        self._seen: OrderedDict[str, int] = OrderedDict()
        self._max = max_tenants

    def lsn(self, tenant_id: str) -> int | None:
        """The highest position seen for a tenant, or None."""
        return self._seen.get(tenant_id)

    def note(self, tenant_id: str, metadata) -> None:
        """Keep the position a response carried, if higher than the one held."""
        lsn = lsn_from(metadata)
        if lsn is None:
            return
        held = self._seen.pop(tenant_id, None)
        self._seen[tenant_id] = lsn if held is None else max(held, lsn)
        if len(self._seen) > self._max:  # forgetting an old tenant costs it only a stale read
            self._seen.popitem(last=False)

    def outgoing(self, details, tenant: str | None = None):
        """details with the position held for their tenant (`tenant`, else their x-tenant-id) added
        (unchanged when none is held)."""
        tenant = tenant or _tenant_of(details)
        lsn = self._seen.get(tenant) if tenant else None
        return details if lsn is None else _with_metadata(details, ((LSN_HEADER, format_lsn(lsn)),))

    async def send(self, continuation, details, request):
        """Make a unary call with its tenant's position, and keep the position its answer carries."""
        tenant = _tenant_of(details)
        call = await continuation(self.outgoing(details, tenant), request)
        if tenant:  # writes are unary: their position comes in the trailers
            self.note(tenant, await call.trailing_metadata())
        return call

    def interceptors(self) -> list:
        """Place after the identity interceptors: they put the x-tenant-id this keys by."""
        return [_TrackUnary(self), _SendUnaryStream(self)]


def _tenant_of(details) -> str | None:
    return next((v for k, v in (details.metadata or ()) if k == "x-tenant-id"), None)


class _TrackUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, tracker: ReadYourWrites):
        self.tracker = tracker

    async def intercept_unary_unary(self, continuation, details, request):
        return await self.tracker.send(continuation, details, request)


def _is_unary(interceptor) -> bool:
    return isinstance(interceptor, grpc.aio.UnaryUnaryClientInterceptor)


class _MeshUnary(grpc.aio.UnaryUnaryClientInterceptor):
    """All a mesh channel adds to a unary call, as one interceptor: grpc.aio runs every interceptor as a
    layer of its own (about 20 us of CPU per layer per call). In order: a CLIENT span when this process
    exports spans (OpenTelemetry's own interceptor, run inside this one), else the caller's trace context
    passed on as it is; the identity of each source; the tenant's read-your-writes position, and the one
    the answer carries."""

    def __init__(
        self,
        sources: tuple[MetadataSource, ...],
        tracker: ReadYourWrites | None,
        traced: grpc.aio.UnaryUnaryClientInterceptor,
    ):
        self._sources = sources
        self._tracker = tracker
        self._traced = traced
        """OpenTelemetry's unary client interceptor, run only while spans are exported."""

    async def intercept_unary_unary(self, continuation, details, request):
        if telemetry.exporting():
            send = functools.partial(self._send, continuation)
            return await self._traced.intercept_unary_unary(send, details, request)
        trace = telemetry.trace_headers()
        return await self._send(continuation, _with_metadata(details, trace) if trace else details, request)

    async def _send(self, continuation, details, request):
        for source in self._sources:
            details = await source.call_details(details)
        if self._tracker is None:
            return await continuation(details, request)
        return await self._tracker.send(continuation, details, request)


class _SendUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, tracker: ReadYourWrites):
        self.tracker = tracker

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self.tracker.outgoing(details), request)


def make_channel(
    address: str,
    *,
    forward: bool = False,
    credentials: MetadataSource | None = None,
    tls: TlsConfig | object | None = TLS_FROM_ENV,
    options: tuple = (),
) -> grpc.aio.Channel:
    """A channel to address (one host:port, a comma-separated list of replicas, or a URI such as
    dns:///svc:port); forward=True carries the current tenant's identity on every call.
    A channel with an identity (forwarded or given) also keeps each tenant's read-your-writes position.

    mTLS (with this process's certificate) when BULKHEAD_TLS_* are set or `tls` is given; `tls=None` forces plaintext.
    """
    # Past the sentinel `tls` is a TlsConfig or None; anything else fails in *_credentials (never plaintext).
    tls = TlsConfig.from_env() if tls is TLS_FROM_ENV else cast("TlsConfig | None", tls)
    sources = (*((ForwardIdentity(),) if forward else ()), *((credentials,) if credentials is not None else ()))
    tracker = ReadYourWrites() if sources else None
    otel = telemetry.client_interceptors()
    interceptors: list = [_MeshUnary(sources, tracker, next(i for i in otel if _is_unary(i)))]
    interceptors += [i for i in otel if not _is_unary(i)]
    for source in sources:
        interceptors += source.stream_interceptors()
    if tracker is not None:
        interceptors.append(_SendUnaryStream(tracker))
    target, options = channel_target(address), (*channel_options(address), *options)
    if tls is not None:
        return grpc.aio.secure_channel(target, channel_credentials(tls), options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)

"""Channels to other services, with identity forwarded (service to service) or fixed (CLI, clients).

Every channel spreads calls over all of a service's replicas (round_robin) and resends the calls the
protos mark idempotent when a replica dies (shared/service_config.py): callers hold no retry loops.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import grpc

from shared import telemetry
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
        return [_UnaryUnary(self), _UnaryStream(self), _StreamUnary(self), _StreamStream(self)]


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
        return (("authorization", f"Bearer {self.token}"), ("x-tenant-id", self.tenant_id),
                ("x-request-id", uuid.uuid4().hex), *self.extra)


def make_channel(address: str, *, forward: bool = False, credentials: MetadataSource | None = None,
                 tls: TlsConfig | None | object = TLS_FROM_ENV, options: tuple = ()) -> grpc.aio.Channel:
    """A channel to address (one host:port, a comma-separated list of replicas, or a URI such as
    dns:///svc:port); forward=True carries the current tenant's identity on every call.

    mTLS (with this process's certificate) when BULKHEAD_TLS_* are set or `tls` is given; `tls=None` forces plaintext.
    """
    tls = TlsConfig.from_env() if tls is TLS_FROM_ENV else tls
    interceptors: list = telemetry.client_interceptors()
    if forward:
        interceptors += ForwardIdentity().interceptors()
    if credentials is not None:
        interceptors += credentials.interceptors()
    target, options = channel_target(address), (*channel_options(address), *options)
    if tls is not None:
        return grpc.aio.secure_channel(target, channel_credentials(tls), options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)

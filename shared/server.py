"""Builds every service's gRPC server the same way: interceptors, health, reflection, graceful stop."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared.auth import TenancyInterceptor
from shared.security import SecurityEvents
from shared.tls import TLS_FROM_ENV, TlsConfig, server_credentials
from shared.tokens import TokenVerifier

log = logging.getLogger("bulkhead.server")


@dataclass(frozen=True)
class Binding:
    """One servicer and how to add it to a server."""

    add_to_server: Callable
    """The generated add_XServicer_to_server function."""
    servicer: object
    """The servicer instance."""
    descriptor: ServiceDescriptor
    """The service's descriptor (for health and reflection)."""
    background: Background | None = None
    """Work beside the servicer (e.g. the security-events flush): started before the server listens,
    stopped after it stops."""


class Background(Protocol):
    """A binding's background work, tied to the server's life."""

    async def start(self, events: SecurityEvents) -> None:
        """Prepare (e.g. migrate its table) and start; events are the server's refusals."""

    async def stop(self) -> None:
        """Stop, finishing what is pending (called once the server stopped taking calls)."""


@dataclass
class RunningServer:
    """A started server and what tests and main() need of it."""

    server: grpc.aio.Server
    port: int
    host: str
    health: health.aio.HealthServicer
    interceptor: TenancyInterceptor
    service_names: tuple[str, ...]
    background: tuple[Background, ...] = ()
    stopped: bool = False
    """Whether stop() ran (a second stop() does nothing)."""

    @property
    def address(self) -> str:
        """host:port clients dial."""
        return f"{self.host}:{self.port}"

    @property
    def security_events(self) -> SecurityEvents:
        return self.interceptor.events

    async def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, finish in-flight calls for up to grace seconds, then stop (once)."""
        if self.stopped:
            return
        self.stopped = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        for work in self.background:
            await work.stop()

    async def wait(self) -> None:
        """Block until the server terminates."""
        await self.server.wait_for_termination()


MAX_CONNECTION_AGE_MS = 300_000
"""After this long a server asks each client connection to go away (GOAWAY; calls in flight finish,
with no grace limit): callers then reconnect and re-resolve, so a replica the autoscaler adds gets
its share of round_robin traffic within minutes instead of never (long-lived channels never dial)."""


async def serve(
    *,
    name: str,
    bindings: Sequence[Binding],
    verifier: TokenVerifier,
    address: str = "127.0.0.1:0",
    tls: TlsConfig | object | None = TLS_FROM_ENV,
    options: Sequence[tuple[str, object]] = (),
    page_key: bytes | None = None,
) -> RunningServer:
    """Start a server with the production interceptor (tenancy, which also opens each call's server span).

    `page_key` signs page tokens (shared.settings.load_page_key); without one they hold in this process only.

    mTLS is on when BULKHEAD_TLS_CA/_CERT/_KEY are set (or `tls` is given); `tls=None` forces plaintext.
    """
    # Past the sentinel `tls` is a TlsConfig or None; anything else fails in *_credentials (never plaintext).
    tls = TlsConfig.from_env() if tls is TLS_FROM_ENV else cast("TlsConfig | None", tls)
    tenancy = TenancyInterceptor(verifier, service=name)
    tenancy.page_key = page_key
    # gRPC takes the first of repeated channel args: the caller's options replace these defaults.
    settings = {"grpc.so_reuseport": 0, "grpc.max_connection_age_ms": MAX_CONNECTION_AGE_MS, **dict(options)}
    server = grpc.aio.server(interceptors=[tenancy], options=list(settings.items()))
    feed = getattr(verifier, "migration_feed", None)  # identity's migration pauses and placements
    for binding in bindings:
        binding.add_to_server(binding.servicer, server)
        follow = getattr(binding.servicer, "follow_migration_feed", None)
        if follow is not None and feed is not None:
            follow(feed)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = tuple(b.descriptor.full_name for b in bindings)
    reflection.enable_server_reflection(
        (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    host, _, _port = address.rpartition(":")
    if tls is not None:
        bound = server.add_secure_port(address, server_credentials(tls))
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"{name}: cannot listen on {address} (is the port in use? set BULKHEAD_{name.upper()}_ADDR)")
    background = tuple(b.background for b in bindings if b.background is not None)
    for work in background:
        await work.start(tenancy.events)
    await server.start()
    for service_name in (*names, ""):
        await health_servicer.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s listening on %s:%d", name, host, bound)
    return RunningServer(
        server=server,
        port=bound,
        host=host or "127.0.0.1",
        health=health_servicer,
        interceptor=tenancy,
        service_names=names,
        background=background,
    )

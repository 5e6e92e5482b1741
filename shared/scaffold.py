"""One lifecycle for every service: start() registers each thing on one AsyncExitStack as it opens it.

    async def start(config: StateConfig, verifier: TokenVerifier, *, address: str | None = None) -> StateService:
        async with Startup(config.service.tls) as up:
            db = up.closing(await open_service_database(config.service, migrations=...))
            provider = CredentialsDataKeyProvider(up.channel(config.credentials_addr, forward=True))
            ...
            running = up.serving(await serve_state(db=db, ..., tls=up.tls))
            return StateService(running=running, stack=up.stack, db=db, ...)

A start() that fails half-way closes what it had opened, newest first; a started service's stop(grace)
stops the server, then closes the rest in the same reverse order. Channels get the TLS of the
environment the service was configured from (ServiceConfig.tls), never the process's.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, TypeVar

import grpc

from shared import telemetry
from shared.client import MetadataSource, make_channel
from shared.config import ServiceConfig
from shared.config_audit import ConfigAudit
from shared.db import Database
from shared.keys import remote_verifier
from shared.logs import register_secret, setup_logging
from shared.metrics import serve_metrics
from shared.process import freeze_startup_heap
from shared.security_events import security_events_binding
from shared.server import Binding, RunningServer, serve
from shared.settings import load_page_key
from shared.telemetry import setup_telemetry
from shared.tls import TlsConfig
from shared.tokens import TokenVerifier

log = logging.getLogger("bulkhead.server")


class Closable(Protocol):
    """Something a service opens and must close."""

    async def close(self) -> Any:
        """Release it."""


class Startable(Protocol):
    """Background work a service starts and must stop."""

    def start(self, *args: Any, **kwargs: Any) -> Any:
        """Start it in the background."""

    async def stop(self) -> Any:
        """Stop it, finishing what is pending."""


C = TypeVar("C", bound=Closable)
S = TypeVar("S", bound=Startable)


class Startup:
    """What one start() opens, each thing registered as it opens: a failure half-way closes those, newest first.

    On success the stack goes to the service (Service.stack), which closes it when it stops."""

    def __init__(self, tls: TlsConfig | None = None, *, owns: Iterable[Closable] = ()) -> None:
        self.tls = tls
        """mTLS for the server and every channel opened here (ServiceConfig.tls), or None for plaintext."""
        self.stack = AsyncExitStack()
        """Everything opened so far, closed in reverse order."""
        for thing in owns:  # opened by the caller, closed with the service (tests' serve_<svc> over a database)
            self.closing(thing)

    async def __aenter__(self) -> Startup:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            await self.stack.aclose()

    def closing(self, thing: C) -> C:
        """thing, closed (its close()) when the service stops or the start fails."""
        self.stack.push_async_callback(thing.close)
        return thing

    def callback(self, fn: Callable[[], Any]) -> None:
        """Call fn (sync) on the way out, e.g. to forget plain keys."""
        self.stack.callback(fn)

    def started(self, work: S, *args: Any, **kwargs: Any) -> S:
        """work, started now (start(*args, **kwargs)) and stopped on the way out."""
        work.start(*args, **kwargs)
        self.stack.push_async_callback(work.stop)
        return work

    def channel(
        self, address: str, *, forward: bool = False, credentials: MetadataSource | None = None
    ) -> grpc.aio.Channel:
        """A channel to a peer with this service's TLS (shared.client.make_channel), closed on the way out."""
        channel = make_channel(address, forward=forward, credentials=credentials, tls=self.tls)
        self.stack.push_async_callback(channel.close)
        return channel

    def channel_pool(self) -> Callable[[str], grpc.aio.Channel]:
        """channel_for(address): one channel per address, opened on first use, all closed on the way out."""
        opened: dict[str, grpc.aio.Channel] = {}

        async def close_all() -> None:
            for channel in opened.values():
                await channel.close()

        self.stack.push_async_callback(close_all)

        def channel_for(address: str) -> grpc.aio.Channel:
            if address not in opened:
                opened[address] = make_channel(address, tls=self.tls)
            return opened[address]

        return channel_for

    def serving(self, running: RunningServer) -> RunningServer:
        """The started server: stopped at once if the rest of start() fails (Service.stop stops it first)."""
        self.stack.push_async_callback(running.stop, 0)
        return running

    def remote_verifier(self, service: ServiceConfig) -> TokenVerifier:
        """A verifier over identity's keys, revocations and suspensions, asked with the service's own key."""
        return self.closing(remote_verifier(self.channel(service.peer("identity")), service.service_key_file))


async def serve_service(
    name: str,
    db: Database,
    binding: Binding,
    lifecycle: Binding,
    *,
    verifier: TokenVerifier,
    address: str,
    tls: TlsConfig | None,
    audit: ConfigAudit | None = None,
    options: Sequence[tuple[str, object]] = (),
) -> RunningServer:
    """A service's gRPC server: its own binding, its tenant lifecycle, its configuration audit (when it has one)
    and its security events, with page tokens signed by the key kept in its database."""
    extra = [audit.binding()] if audit is not None else []
    return await serve(
        name=name,
        bindings=[binding, lifecycle, *extra, security_events_binding(name, db)],
        verifier=verifier,
        address=address,
        tls=tls,
        page_key=await load_page_key(db, name),
        options=options,
    )


@dataclass(kw_only=True)
class Service:
    """A started service: its server, and what its start() opened (each service's subclass names the parts
    tests reach into)."""

    running: RunningServer
    """The gRPC server."""
    stack: AsyncExitStack = field(repr=False)
    """What start() opened, closed newest first."""

    @property
    def address(self) -> str:
        """host:port of the gRPC server."""
        return self.running.address

    async def stop(self, grace: float = 5.0) -> None:
        """Stop serving (calls in flight get grace seconds), then close what start() opened, newest first."""
        await self.running.stop(grace)
        await self.stack.aclose()

    async def close(self, grace: float = 0.0) -> None:
        """stop(grace), for callers that close what they opened (a stopped server stays stopped)."""
        await self.stop(grace)


async def run_service(
    service: ServiceConfig,
    start: Callable[[Startup], Awaitable[Service]],
    *,
    secrets: Iterable[str] = (),
    grace: float = 5.0,
) -> None:
    """Run one service until SIGTERM/SIGINT: logs, traces, metrics, then start(up) (which may open what it
    needs first on up, e.g. up.remote_verifier), freeze what start-up allocated (shared.process), then stop.
    `secrets` (e.g. a Vault token) are redacted from every log line."""
    setup_logging(service.name, service.log_level)
    for value in secrets:
        register_secret(value)
    setup_telemetry(service.name, service.otlp_endpoint)
    serve_metrics(service.metrics_port)
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    # Before start(): it says the service listens, and a SIGTERM from then on must stop it cleanly (not kill it,
    # the signal's default). One during start() stops the start; what it opened is closed (Startup).
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled.set)
    stopper = asyncio.ensure_future(signalled.wait())
    try:
        async with Startup(service.tls) as up:
            starting = asyncio.ensure_future(start(up))
            await asyncio.wait({starting, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                starting.cancel()
            app = up.closing(await starting)  # a cancelled start raises here, inside Startup: it closes what opened
    except asyncio.CancelledError:
        if not signalled.is_set():
            raise
        log.info("stopped while starting")
        telemetry.shutdown_telemetry()
        return
    freeze_startup_heap()
    waiter = asyncio.ensure_future(app.running.wait())
    try:
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        log.info("shutting down")
        await app.running.stop(grace)  # before the waiter is cancelled: cancelling it mid-shutdown aborts the stop
        await up.stack.aclose()  # the service, then what start() was given (its verifier)
        telemetry.shutdown_telemetry()
        for task in (waiter, stopper):
            task.cancel()

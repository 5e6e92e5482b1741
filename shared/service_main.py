"""The one main() every service but identity shares: logs, traces, metrics, identity's keys, serve until signalled."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from shared.client import make_channel
from shared.config import ServiceConfig
from shared.keys import remote_verifier
from shared.logs import register_secret, setup_logging
from shared.metrics import serve_metrics
from shared.server import RunningServer, run_until_signalled
from shared.telemetry import setup_telemetry
from shared.tokens import TokenVerifier


class ServiceApp(Protocol):
    """What a service's start() returns."""

    running: RunningServer

    async def close(self) -> Any:
        """Release what the service holds (after the server stopped)."""


async def run_service(
    service: ServiceConfig, start: Callable[[TokenVerifier], Awaitable[ServiceApp]], *, secrets: Iterable[str] = ()
) -> None:
    """Run one service until SIGTERM/SIGINT; `secrets` (e.g. its Vault token) are redacted from every log line."""
    setup_logging(service.name, service.log_level)
    for value in secrets:
        register_secret(value)
    setup_telemetry(service.name, service.otlp_endpoint)
    serve_metrics(service.metrics_port)
    identity = make_channel(service.peer("identity"))
    verifier = remote_verifier(identity, service.service_key_file)
    app = await start(verifier)

    async def close() -> None:
        await app.close()
        await verifier.close()
        await identity.close()

    await run_until_signalled(app.running, on_stop=close)

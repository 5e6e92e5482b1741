"""Serve the console with uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import uvicorn

from console._app import create_app
from console._config import ConsoleConfig


def serve(env: Mapping[str, str] = os.environ, *, address: str | None = None) -> int:
    """Run the console in the foreground; returns when it is stopped."""
    config = ConsoleConfig.from_env(env)
    if address:
        config = ConsoleConfig(**{**config.__dict__, "address": address})
    kwargs: dict[str, Any] = {}
    if config.tls_cert and config.tls_key:
        kwargs.update(ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key)
    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        **kwargs,
    )
    return 0

"""The tenant console: a web client of the mesh's public gRPC APIs, holding no data of its own.

`bulkhead console` (or `python -m console`) serves it; `create_app()` gives the ASGI app.
"""

from __future__ import annotations

from console._app import create_app, usage_csv
from console._config import DEFAULT_ADDR, ConsoleConfig

__all__ = ["DEFAULT_ADDR", "ConsoleConfig", "create_app", "usage_csv"]

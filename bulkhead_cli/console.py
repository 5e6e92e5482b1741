"""`bulkhead console`: the tenant web console alone, against a mesh already running (e.g. `bulkhead up`)."""

from __future__ import annotations

import argparse
import os


def register(subparsers) -> None:
    """Add the `console` command."""
    parser = subparsers.add_parser("console", help="serve the tenant web console (sign in with an API key)")
    parser.add_argument(
        "--addr", default=None, help="host:port to listen on (default $BULKHEAD_CONSOLE_ADDR, else 127.0.0.1:8080)"
    )
    parser.set_defaults(func=_console)


def _console(args: argparse.Namespace) -> int:
    from console._config import ConsoleConfig
    from console._server import serve

    address = args.addr or ConsoleConfig.from_env(os.environ).address
    print(f"console on http://{address}/ (services at their BULKHEAD_<SVC>_ADDR); Ctrl-C stops it", flush=True)
    return serve(os.environ, address=address)

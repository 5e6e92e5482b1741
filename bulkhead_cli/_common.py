"""What every CLI command shares: connecting with the caller's credentials, tables, friendly errors."""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NoReturn

import grpc

from bulkhead.client import Client, describe_error
from shared.config import data_dir


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    """--api-key / --data-dir: who the command acts as (defaults: BULKHEAD_API_KEY, then the local operator key)."""
    parser.add_argument(
        "--api-key", default=None, help="API key to act with (default: $BULKHEAD_API_KEY, else the local operator key)"
    )
    parser.add_argument("--data-dir", default=None, help="data directory of `bulkhead up` (default: ./.bulkhead)")


def resolve_api_key(args: argparse.Namespace, env=os.environ) -> str | None:
    """The API key a command uses: --api-key, $BULKHEAD_API_KEY, or <data dir>/operator.key."""
    if getattr(args, "api_key", None):
        return args.api_key
    if env.get("BULKHEAD_API_KEY"):
        return env["BULKHEAD_API_KEY"]
    directory = Path(args.data_dir) if getattr(args, "data_dir", None) else data_dir(env)
    key_file = directory / "operator.key"
    return key_file.read_text().strip() if key_file.exists() else None


async def connect(args: argparse.Namespace, env=os.environ) -> Client:
    """A client acting with the resolved credentials; exits with advice when there are none."""
    key = resolve_api_key(args, env)
    if key is None and not env.get("BULKHEAD_TOKEN"):
        fail("no credentials: pass --api-key, set BULKHEAD_API_KEY, or run `bulkhead up` here first")
    return await Client.connect(
        api_key=key, token=env.get("BULKHEAD_TOKEN"), tenant_id=env.get("BULKHEAD_TENANT"), env=env
    )


def fail(message: str, code: int = 1) -> NoReturn:
    """Print an error that says what to do next, and exit."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_async(func: Callable) -> Callable[[argparse.Namespace], int]:
    """Wrap an async command: run it, and turn RPC errors into one readable line."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(func(args)) or 0
        except grpc.aio.AioRpcError as err:
            fail(describe_error(err))
        except KeyboardInterrupt:
            return 130
        return 0

    return wrapper


def table(rows: Iterable[Sequence[object]], headers: Sequence[str], out=None) -> str:
    """A plain-text table with aligned columns (printed, and returned for tests)."""
    cells = [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    lines = [
        "  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    # A row shorter than the headers leaves the last columns empty; a longer one is cut to them.
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in cells]
    text = "\n".join(lines)
    print(text, file=out or sys.stdout)
    return text


def read_secret_value(prompt: str = "value: ") -> str:
    """A secret value from stdin when piped, else a no-echo prompt: never from argv."""
    if not sys.stdin.isatty():
        return sys.stdin.read().rstrip("\n")
    import getpass

    return getpass.getpass(prompt)

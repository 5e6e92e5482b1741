"""`bulkhead up`: the whole mesh on this machine, on embedded defaults unless told otherwise."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path

from bulkhead_cli._common import fail, table
from bulkhead_cli.supervisor import MAX_REPLICAS, REPLICA_STRIDE, Supervisor, available_services
from shared.config import SERVICE_PORTS

DEFAULT_CONSOLE_ADDR = "127.0.0.1:8080"
"""Where `up` starts the web console unless told otherwise (console._config.DEFAULT_ADDR)."""


def register(subparsers) -> None:
    parser = subparsers.add_parser("up", help="run all services on this machine (Ctrl-C stops them)")
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("BULKHEAD_DATA_DIR", ".bulkhead"),
        help="SQLite files, key files and the operator key (default ./.bulkhead)",
    )
    parser.add_argument("--postgres", metavar="DSN", help="use Postgres (runtime role) instead of SQLite")
    parser.add_argument("--postgres-owner", metavar="DSN", help="Postgres URL of the table owner, for migrations")
    parser.add_argument("--vault", metavar="URL", help="keep secrets in Vault/OpenBao at URL instead of locally")
    parser.add_argument(
        "--vault-token",
        default=os.environ.get("BULKHEAD_VAULT_TOKEN"),
        help="token credentials uses to administer Vault (default $BULKHEAD_VAULT_TOKEN)",
    )
    parser.add_argument("--otlp", metavar="ENDPOINT", help="export traces with OTLP/gRPC (e.g. http://localhost:4317)")
    parser.add_argument("--only", nargs="+", choices=[*SERVICE_PORTS, "console"], help="run only these services")
    parser.add_argument(
        "--console",
        metavar="ADDR",
        default=None,
        help="where the web console listens (default $BULKHEAD_CONSOLE_ADDR, else 127.0.0.1:8080, "
        "or PORT_BASE+80 with --port-base)",
    )
    parser.add_argument("--no-console", action="store_true", help="do not start the web console")
    parser.add_argument(
        "--port-base",
        type=int,
        default=0,
        help="listen on PORT_BASE+1..+6 instead of 50051..50056 (metrics on 9451.. moved alike)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help=f"run N processes of every service (1..{MAX_REPLICAS}; replica i on its port "
        f"+{REPLICA_STRIDE}*i); callers spread calls over them and resend idempotent ones",
    )
    parser.add_argument("--quiet", action="store_true", help="do not show the services' log lines")
    parser.set_defaults(func=_up)


def mesh_env(args: argparse.Namespace, base=os.environ) -> dict[str, str]:
    """The environment every service of this run gets."""
    env = dict(base)
    env["BULKHEAD_DATA_DIR"] = str(Path(args.data_dir).resolve())
    env.setdefault("BULKHEAD_SECRETS_BACKEND", "local")
    # state encrypts with data keys from the tenant's own key in credentials, as in production.
    env.setdefault("BULKHEAD_STATE_ENCRYPTION", "credentials")
    env.setdefault("BULKHEAD_MODEL_PROVIDER", "anthropic" if env.get("ANTHROPIC_API_KEY") else "offline")
    if args.postgres:
        env["BULKHEAD_DATABASE_URL"] = args.postgres
        env["BULKHEAD_DATABASE_OWNER_URL"] = args.postgres_owner or args.postgres
    if args.vault:
        env.update(BULKHEAD_SECRETS_BACKEND="vault", BULKHEAD_VAULT_ADDR=args.vault)
        if args.vault_token:
            env["BULKHEAD_VAULT_TOKEN"] = args.vault_token
    if args.otlp:
        env["BULKHEAD_OTLP_ENDPOINT"] = args.otlp
    for name, port in SERVICE_PORTS.items():
        if args.port_base:
            env[f"BULKHEAD_{name.upper()}_ADDR"] = f"127.0.0.1:{args.port_base + port % 100}"
            env[f"BULKHEAD_{name.upper()}_METRICS_PORT"] = str(args.port_base + 100 + port % 100)
        env.setdefault(f"BULKHEAD_{name.upper()}_ADDR", f"127.0.0.1:{port}")
        env.setdefault(f"BULKHEAD_{name.upper()}_METRICS_PORT", str(9400 + port % 100))
    return env


def _up(args: argparse.Namespace) -> int:
    services = [s for s in available_services() if not args.only or s in args.only]
    if not services and not (args.only and "console" in args.only):
        fail("no services found: run this from a Bulkhead checkout installed with `pip install -e .`")
    if not 1 <= args.replicas <= MAX_REPLICAS:
        fail(f"--replicas must be 1..{MAX_REPLICAS}")
    env = mesh_env(args)
    return asyncio.run(_run(services, env, quiet=args.quiet, console=console_addr(args, env), replicas=args.replicas))


def console_addr(args: argparse.Namespace, env: dict[str, str]) -> str | None:
    """Where the console of this run listens, or None when it is not started."""
    if args.no_console or (args.only and "console" not in args.only):
        return None
    if args.console:
        return args.console
    if args.port_base:
        return f"127.0.0.1:{args.port_base + 80}"
    return env.get("BULKHEAD_CONSOLE_ADDR") or DEFAULT_CONSOLE_ADDR


async def _run(
    services: list[str], env: dict[str, str], *, quiet: bool, console: str | None = None, replicas: int = 1
) -> int:
    try:
        supervisor = Supervisor(services, env, show_logs=not quiet, console=console, replicas=replicas)
    except ValueError as exc:
        print(f"error: {exc}", flush=True)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    each = f" x {replicas} replicas" if replicas > 1 else ""
    print(
        f"starting {len(services) + bool(console)} services{each} (data in {env['BULKHEAD_DATA_DIR']}) ...", flush=True
    )
    try:
        starting = asyncio.create_task(supervisor.start())
        done, _ = await asyncio.wait({starting, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if starting not in done:
            starting.cancel()
            raise KeyboardInterrupt
        starting.result()
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", flush=True)
        await supervisor.stop()
        return 1
    except KeyboardInterrupt:
        await supervisor.stop()
        print("stopped", flush=True)
        return 130
    print()
    table(supervisor.rows(), ["service", "grpc", "metrics", "pid", "state", "restarts"])
    if console:
        print(f"\nconsole: http://{console}/  (sign in with a tenant's API key)")
    key_file = Path(env["BULKHEAD_DATA_DIR"]) / "operator.key"
    if key_file.exists():
        print(f"\noperator API key: {key_file.read_text().strip()}\n  (kept in {key_file}, mode 0600)")
    print(
        f"provider: {env['BULKHEAD_MODEL_PROVIDER']}   secrets: {env['BULKHEAD_SECRETS_BACKEND']}   "
        f"database: {'postgres' if env.get('BULKHEAD_DATABASE_URL') else 'sqlite'}"
    )
    if replicas > 1:
        # The CLI in another terminal reaches the first replica of each by default; these reach them all.
        print("\nto spread your own calls over every replica:")
        for name in services:
            print(f"  export BULKHEAD_{name.upper()}_ADDR={supervisor.env[f'BULKHEAD_{name.upper()}_ADDR']}")
    print("\nall services healthy. try `bulkhead demo` in another terminal; Ctrl-C stops everything.\n", flush=True)
    await stop.wait()
    print("\nstopping ...", flush=True)
    await supervisor.stop()
    print("all services stopped", flush=True)
    return 0

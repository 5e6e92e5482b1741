"""`bulkhead demo`: the two-tenant tour against a running mesh (start it with `bulkhead up`)."""

from __future__ import annotations

import argparse
import os

from bulkhead_cli._common import add_connection_args, fail, resolve_api_key, run_async, table
from shared.config import SERVICES, service_addr
from shared.telemetry import setup_telemetry, shutdown_telemetry


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="two tenants, two concurrent workflows, usage, a refused cross-tenant call"
    )
    parser.add_argument(
        "--tier",
        choices=("pooled", "bridge", "silo"),
        default="pooled",
        help="isolation tier of the two tenants (default: pooled)",
    )
    add_connection_args(parser)
    parser.set_defaults(func=_demo)


@run_async
async def _demo(args: argparse.Namespace) -> None:
    from bulkhead_cli.tour import run_demo

    key = resolve_api_key(args)
    if not key or not key.startswith("bk_t_platform_"):
        fail(
            "the demo creates tenants, so it needs the operator key: run it where `bulkhead up` runs "
            "(it reads .bulkhead/operator.key), or pass --api-key"
        )
    otlp = os.environ.get("BULKHEAD_OTLP_ENDPOINT")
    setup_telemetry("demo", otlp)
    addresses = {s: service_addr(s) for s in SERVICES}
    result = await run_demo(key, addresses, tier=args.tier)
    print("runs:")
    table(
        [[t.name, t.run_id, t.status, len(t.steps), t.trace_id] for t in result.tenants],
        ["tenant", "run", "status", "steps", "trace id"],
    )
    print("\nusage per tenant (from metering; each tenant sees only its own):")
    table(result.usage, ["tenant", "agent", "model", "calls", "input tok", "output tok", "cost usd"])
    print("\ncross-tenant attempt:")
    for line in result.refusals:
        print(f"  {line}")
    print("\nwhere to look next:")
    if otlp:
        print("  traces: Jaeger UI -> search by trace id above (one trace per workflow, across all services)")
    else:
        print("  traces: run `bulkhead up --otlp http://localhost:4317` with Jaeger (deploy/compose.yaml) to see them")
    print("  usage:  BULKHEAD_API_KEY=<tenant admin key> bulkhead usage query")
    print("  runs:   bulkhead runs list")
    shutdown_telemetry()

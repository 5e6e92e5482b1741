#!/usr/bin/env python3
"""ExchangeToken's cost: what every StartRun pays identity for its run's delegated token (issue 16).

identity runs in a child process (real server stack, migrations, audit, background loops) on SQLite
and then on Postgres (testkit.postgres, RLS under a runtime role that owns nothing). This process is
the client: a tenant of each tier is made through the public API, and calls are made one at a time
in interleaved blocks, so that each RPC sees the same moments of a shared machine's load:

  health         grpc.health.v1 Check: the server stack's floor (interceptors, no handler work)
  get_tenant     GetTenant: a cheap identity RPC with one platform-table read
  exchange       ExchangeToken as the orchestrator makes it (scopes, run_id, ttl), per tier
  revocations    ListRevokedTokens as every other service polls it (each second) with its platform key

Prints p50 latency and server CPU per call (the child's /proc counters over each block) for each,
and the ratios to the health check. `--profile FILE` runs the server under cProfile and prints its
top functions (cumulative) after the run; `--quick` runs a few seconds.

    python bench/identity_exchange.py --quick
    python bench/identity_exchange.py --profile /tmp/identity.prof --only sqlite
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from bench._figures import add_json_option, write_json  # noqa: E402
from bulkhead.common.v1 import tenancy_pb2  # noqa: E402
from bulkhead.identity.v1 import identity_pb2 as pb  # noqa: E402
from bulkhead.identity.v1 import identity_pb2_grpc  # noqa: E402

TIERS = {"pooled": tenancy_pb2.TIER_POOLED, "bridge": tenancy_pb2.TIER_BRIDGE, "silo": tenancy_pb2.TIER_SILO}
RUN_SCOPES = ["state.*", "inference.*", "credentials.secrets.read"]
"""Scopes like those the orchestrator asks for a run (services/orchestrator: the run's tools and model)."""


def _serve(env: dict[str, str], queue, measuring, stop, profile: str) -> None:
    """Child process: identity on `env`'s database until `stop` is set; with `profile`, its event loop
    runs under cProfile from `measuring` (set after the warm-up) to `stop`, the stats written there."""
    import cProfile

    profiler = cProfile.Profile()

    async def run() -> None:
        from services.identity.config import IdentityConfig
        from services.identity.server import start

        app = await start(IdentityConfig.from_env(env), address="127.0.0.1:0", announce=io.StringIO())
        key = app.operator_key or (Path(env["BULKHEAD_DATA_DIR"]) / "operator.key").read_text().strip()
        service_key = (app.service_keys_dir / "state.key").read_text().strip()
        queue.put((app.running.address, key, service_key))
        await asyncio.to_thread(measuring.wait)
        if profile:
            profiler.enable()
        await asyncio.to_thread(stop.wait)
        if profile:
            profiler.disable()
            profiler.dump_stats(profile)
        await app.close(0)

    asyncio.run(run())


def _cpu_seconds(pid: int) -> float:
    """User + system CPU a process (all its threads) has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure(
    address: str, operator_key: str, service_key: str, pid: int, measuring, *, blocks: int, per_block: int
) -> dict[str, Any]:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        op = await stub.IssueToken(pb.IssueTokenRequest(api_key=operator_key))
        op_md = (("authorization", f"Bearer {op.token}"), ("x-tenant-id", op.tenant_id))
        calls: dict[str, Any] = {
            "health": (health_pb2_grpc.HealthStub(channel).Check, health_pb2.HealthCheckRequest(), ()),  # type: ignore[attr-defined]
        }
        for tier, value in TIERS.items():
            made = await stub.CreateTenant(
                pb.CreateTenantRequest(name=f"bench-{tier}-{uuid.uuid4().hex[:6]}", tier=value), metadata=op_md
            )
            tok = await stub.IssueToken(pb.IssueTokenRequest(api_key=made.admin_api_key, ttl_seconds=3600))
            md = (("authorization", f"Bearer {tok.token}"), ("x-tenant-id", tok.tenant_id))
            if tier == "pooled":
                calls["get_tenant"] = (stub.GetTenant, pb.GetTenantRequest(), md)
            request = pb.ExchangeTokenRequest(scopes=RUN_SCOPES, run_id="r_bench", ttl_seconds=900)
            calls[f"exchange_{tier}"] = (stub.ExchangeToken, request, md)
        svc = await stub.IssueToken(pb.IssueTokenRequest(api_key=service_key))
        svc_md = (("authorization", f"Bearer {svc.token}"), ("x-tenant-id", svc.tenant_id))
        calls["revocations"] = (stub.ListRevokedTokens, pb.ListRevokedTokensRequest(), svc_md)
        for method, request, md in calls.values():  # warm up: connection, caches, statement caches
            for _ in range(30):
                await method(request, metadata=md)
        measuring.set()
        lat: dict[str, list[float]] = {name: [] for name in calls}
        cpu: dict[str, float] = dict.fromkeys(calls, 0.0)
        for _ in range(blocks):
            for name, (method, request, md) in calls.items():
                before = _cpu_seconds(pid)
                for _ in range(per_block):
                    start = time.perf_counter()
                    await method(request, metadata=md)
                    lat[name].append(time.perf_counter() - start)
                cpu[name] += _cpu_seconds(pid) - before
    n = blocks * per_block
    return {name: {"p50": statistics.median(v) * 1e3, "cpu": cpu[name] / n * 1e3} for name, v in lat.items()}


def _database_env(kind: str, server) -> dict[str, str]:
    if kind == "sqlite":
        return {}
    urls = server.create_database_sync(f"bench_identity_{os.getpid()}_{time.monotonic_ns() % 10**6}")
    return {"BULKHEAD_IDENTITY_DATABASE_URL": urls.app_url, "BULKHEAD_IDENTITY_DATABASE_OWNER_URL": urls.owner_url}


def _run(kind: str, server, *, blocks: int, per_block: int, profile: str) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-identity-") as data:
        env = {"BULKHEAD_DATA_DIR": data, **_database_env(kind, server)}
        queue, measuring, stop = ctx.Queue(), ctx.Event(), ctx.Event()
        child = ctx.Process(target=_serve, args=(env, queue, measuring, stop, profile), daemon=True)
        child.start()
        try:
            address, key, service_key = queue.get(timeout=120)
            pid = child.pid or 0
            return asyncio.run(_measure(address, key, service_key, pid, measuring, blocks=blocks, per_block=per_block))
        finally:
            measuring.set()
            stop.set()
            child.join(30)


def _print(kind: str, figures: dict[str, Any]) -> None:
    base = figures["health"]
    print(f"\n{kind}: {'rpc':<18} {'p50 ms':>8} {'x health':>9} {'server CPU ms/call':>19} {'x health':>9}")
    for name, f in figures.items():
        print(
            f"{'':<{len(kind) + 1}} {name:<18} {f['p50']:>8.3f} {f['p50'] / base['p50']:>9.2f} "
            f"{f['cpu']:>19.3f} {f['cpu'] / base['cpu'] if base['cpu'] else float('nan'):>9.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few seconds")
    parser.add_argument("--only", choices=("sqlite", "postgres"), help="one database only")
    parser.add_argument("--profile", metavar="FILE", help="profile the server while measured; stats to FILE.<db>")
    parser.add_argument("--top", type=int, default=35, help="functions of the profile to print")
    add_json_option(parser)
    args = parser.parse_args()
    blocks, per_block = (4, 50) if args.quick else (10, 200)
    kinds = [args.only] if args.only else ["sqlite", "postgres"]
    server = None
    out: dict[str, float] = {}
    try:
        if "postgres" in kinds:
            from testkit.postgres import start_postgres

            server = start_postgres()
        for kind in kinds:
            profile = f"{args.profile}.{kind}" if args.profile else ""
            figures = _run(kind, server, blocks=blocks, per_block=per_block, profile=profile)
            _print(kind, figures)
            for name, f in figures.items():
                out[f"{kind}_{name}_p50_ms"] = f["p50"]
                out[f"{kind}_{name}_server_cpu_ms_per_call"] = f["cpu"]
            if profile:
                import pstats

                print(f"\ncProfile of the {kind} server ({profile}), cumulative:")
                stats = pstats.Stats(profile, stream=sys.stdout)
                stats.sort_stats("cumulative").print_stats(args.top)
                print(f"\ncProfile of the {kind} server, own time:")
                stats.sort_stats("tottime").print_stats(args.top)
    finally:
        if server is not None:
            server.stop()
    write_json(args.json, out)


if __name__ == "__main__":
    main()

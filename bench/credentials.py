#!/usr/bin/env python3
"""GetSecret speed on both backends, next to the raw hvac read the vault backend wraps.

One run starts an OpenBao dev server, then, one at a time, a credentials server per backend in a
child process (real interceptors, SQLite, audit on). This process is the client. It measures:

- GetSecret latency (sequential calls: p50/p99) and throughput (concurrent callers) per backend;
- the raw hvac KV v2 read of the same secret with the same per-tenant token (the baseline), for the
  latency ratio taken in turns with GetSecret's sequential calls so that both see the same load;
- grpc.health.v1 Check on the same local server: the floor of the production interceptor stack
  (OpenTelemetry + tenancy) on this machine, which no RPC of ours can beat.

Prints figures and the ratios the issue asks for: vault GetSecret p50 / raw hvac p50 (target
<= 1.5) and local reads/s (target >= 3000). `--quick` runs a few seconds for smoke testing.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
import hvac

from bench._figures import add_json_option, write_json
from bulkhead.credentials.v1 import credentials_pb2 as pb
from bulkhead.credentials.v1 import credentials_pb2_grpc

TENANT = "t_bench"
SECRET = "bench-secret"
VALUE = b"bench-value-0123456789abcdef"


def _serve(kind: str, bao_url: str, bao_token: str, key_bytes: bytes, kid: str, queue, stop, profile: str = "") -> None:
    """Child process: a credentials server on `kind`, with one secret written for TENANT (under
    cProfile, its stats written to `profile`, when given)."""

    async def run() -> None:
        from services.credentials.backend import TenantRef
        from services.credentials.local_backend import LocalBackend
        from services.credentials.master_key import load_or_create_master_key
        from services.credentials.server import MIGRATIONS, serve_credentials
        from services.credentials.vault_backend import VaultBackend
        from shared.db import Database
        from shared.tenancy import TenantContext, tenant_scope
        from shared.tokens import SigningKey, StaticKeySource, TokenVerifier

        tmp = Path(tempfile.mkdtemp(prefix="bench-cred-"))
        db = await Database.open(f"sqlite+aiosqlite:///{tmp / 'credentials.db'}", migrations=MIGRATIONS)
        backend = (
            VaultBackend(bao_url, bao_token, token_ttl_seconds=900)
            if kind == "vault"
            else LocalBackend(db, load_or_create_master_key(tmp / "master.key"))
        )
        key = SigningKey.from_private_bytes(kid, key_bytes)
        verifier = TokenVerifier(StaticKeySource({kid: key.public_key}))
        service = await serve_credentials(db=db, backend=backend, verifier=verifier, audit_key=os.urandom(32))
        with tenant_scope(TenantContext(TENANT, "p_bench")):
            await service.secrets.put(SECRET, VALUE)
        token = ""
        if isinstance(backend, VaultBackend):
            token = await asyncio.to_thread(backend.tokens.token_for, TenantRef(TENANT))
        queue.put((service.running.port, token))
        await asyncio.to_thread(stop.wait)
        await service.stop(grace=0.5)

    if not profile:
        asyncio.run(run())
        return
    import cProfile

    profiler = cProfile.Profile()
    profiler.runcall(asyncio.run, run())
    profiler.dump_stats(profile)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU a process (all its threads) has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pcts(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2] * 1e3, ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3


async def _grpc_figures(
    port: int, md, *, calls: int, seconds: float, concurrency: int, health: bool = False, server_pid: int, paired=None
) -> dict:
    """Latency of sequential calls and throughput of concurrent ones. With `paired` (a blocking
    baseline call), each sequential call is followed by one baseline call, timed apart: both see
    the same moments of a shared machine's load, so their ratio holds up under noise."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        method: Any
        request: Any
        if health:
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            # types-grpcio-health-checking's HealthStub lists no RPCs
            method = health_pb2_grpc.HealthStub(channel).Check  # type: ignore[attr-defined]
            request = health_pb2.HealthCheckRequest()
        else:
            method = credentials_pb2_grpc.CredentialsServiceStub(channel).GetSecret
            request = pb.GetSecretRequest(name=SECRET)
        for _ in range(50):  # warm up: connection, token cache, per-tenant Vault token
            reply = await method(request, metadata=md)
            assert health or reply.value == VALUE
        lat, paired_lat = [], []
        for _ in range(calls):
            start = time.perf_counter()
            await method(request, metadata=md)
            lat.append(time.perf_counter() - start)
            if paired is not None:
                start = time.perf_counter()
                paired()
                paired_lat.append(time.perf_counter() - start)
        done = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await method(request, metadata=md)
                done += 1

        cpu, client_cpu, start = _cpu_seconds(server_pid), time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        cpu, client_cpu = _cpu_seconds(server_pid) - cpu, time.process_time() - client_cpu
    p50, p99 = _pcts(lat)
    return {
        "p50": p50,
        "p99": p99,
        "rps": done / elapsed,
        "cpu_ms": cpu / done * 1e3,
        "client_cpu_ms": client_cpu / done * 1e3,
        "paired_p50": _pcts(paired_lat)[0] if paired_lat else None,
    }


def _raw_read(url: str, token: str):
    """The baseline: hvac's KV v2 read of the bench secret with the tenant's own token."""
    client = hvac.Client(url=url, token=token)
    path = f"tenants/{TENANT}/{SECRET}"

    def read() -> None:
        client.secrets.kv.v2.read_secret_version(
            path, version=1, mount_point="bulkhead-kv", raise_on_deleted_version=True
        )

    return read


def _hvac_figures(url: str, token: str, *, calls: int, seconds: float, concurrency: int) -> dict:
    client = hvac.Client(url=url, token=token)
    path = f"tenants/{TENANT}/{SECRET}"

    def read(c: hvac.Client) -> None:
        c.secrets.kv.v2.read_secret_version(path, version=1, mount_point="bulkhead-kv", raise_on_deleted_version=True)

    for _ in range(50):
        read(client)
    lat = []
    for _ in range(calls):
        start = time.perf_counter()
        read(client)
        lat.append(time.perf_counter() - start)
    deadline = time.perf_counter() + seconds

    def worker() -> int:
        own, n = hvac.Client(url=url, token=token), 0
        while time.perf_counter() < deadline:
            read(own)
            n += 1
        return n

    cpu, start = time.process_time(), time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        done = sum(pool.map(lambda _: worker(), range(concurrency)))
    p50, p99 = _pcts(lat)
    return {
        "p50": p50,
        "p99": p99,
        "rps": done / (time.perf_counter() - start),
        "cpu_ms": (time.process_time() - cpu) / done * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few seconds, for smoke testing")
    parser.add_argument("--only", choices=("vault", "local"), help="measure one backend (no ratios printed)")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="run each server under cProfile, writing DIR/<backend>.prof "
        "(slower: for finding hot spots, not for figures)",
    )
    add_json_option(parser)
    args = parser.parse_args()
    calls, seconds, concurrency = (200, 1.0, 16) if args.quick else (1000, 5.0, 32)

    from testkit.openbao import start_openbao
    from testkit.tokens import TestTokens

    tokens = TestTokens()
    md = tokens.metadata(TENANT, ("credentials.secrets.read",), ttl=3600)
    bao = start_openbao()
    ctx = multiprocessing.get_context("spawn")
    results: dict[str, dict] = {}
    try:
        for kind in (args.only,) if args.only else ("vault", "local"):
            queue, stop = ctx.Queue(), ctx.Event()
            profile = str(Path(args.profile) / f"{kind}.prof") if args.profile else ""
            child = ctx.Process(
                target=_serve,
                args=(kind, bao.url, bao.root_token, tokens.key.private_bytes(), tokens.key.kid, queue, stop, profile),
                daemon=True,
            )
            child.start()
            assert child.pid is not None  # started
            try:
                port, vault_token = queue.get(timeout=60)
                paired = _raw_read(bao.url, vault_token) if kind == "vault" else None
                results[kind] = asyncio.run(
                    _grpc_figures(
                        port,
                        md,
                        calls=calls,
                        seconds=seconds,
                        concurrency=concurrency,
                        server_pid=child.pid,
                        paired=paired,
                    )
                )
                if kind == "vault":
                    results["raw hvac"] = _hvac_figures(
                        bao.url, vault_token, calls=calls, seconds=seconds, concurrency=concurrency
                    )
                else:
                    results["health"] = asyncio.run(
                        _grpc_figures(
                            port,
                            md,
                            calls=calls,
                            seconds=seconds,
                            concurrency=concurrency,
                            health=True,
                            server_pid=child.pid,
                        )
                    )
            finally:
                stop.set()
                child.join(30)
    finally:
        bao.close()
    if args.only:
        for name, r in results.items():
            print(f"{name:<22}{r['p50']:>10.3f}{r['p99']:>10.3f}{r['rps']:>12.0f}{r['cpu_ms']:>12.3f}")
        return

    print(
        f"GetSecret, {calls} sequential calls for latency, {concurrency} concurrent callers for "
        f"{seconds:.0f}s for throughput"
    )
    print(
        f"{'path':<22}{'p50 ms':>10}{'p99 ms':>10}{'reads/s':>12}{'CPU ms/read':>12}  (server process; raw hvac: "
        f"the client's)"
    )
    for name, label in (
        ("raw hvac", "raw hvac read"),
        ("vault", "GetSecret vault"),
        ("local", "GetSecret local"),
        ("health", "health Check (floor)"),
    ):
        r = results[name]
        print(f"{label:<22}{r['p50']:>10.3f}{r['p99']:>10.3f}{r['rps']:>12.0f}{r['cpu_ms']:>12.3f}")
    ratio = results["vault"]["p50"] / results["vault"]["paired_p50"]
    print(
        f"\nvault GetSecret p50 / raw hvac p50 = {ratio:.2f}x (target <= 1.5x), the two calls taken in turns "
        f"({results['vault']['p50']:.3f} / {results['vault']['paired_p50']:.3f} ms); against the raw hvac "
        f"row above, measured after: {results['vault']['p50'] / results['raw hvac']['p50']:.2f}x"
    )
    floor = results["health"]["p50"] + results["vault"]["paired_p50"]
    print(
        f"a GetSecret that wrapped the hvac read itself would cost at least health Check p50 + raw hvac p50 = "
        f"{floor:.3f} ms = {floor / results['vault']['paired_p50']:.2f}x raw hvac (the gRPC round trip alone)"
    )
    print(f"vault GetSecret reads/s / raw hvac reads/s = {results['vault']['rps'] / results['raw hvac']['rps']:.2f}")
    print(
        f"local GetSecret reads/s = {results['local']['rps']:.0f} (target >= 3000); "
        f"{results['local']['rps'] / results['health']['rps']:.2f}x of the interceptor-stack floor "
        f"({results['health']['rps']:.0f}/s for a health Check through the same server)"
    )
    write_json(
        args.json,
        {
            "local_reads_per_s": results["local"]["rps"],
            "vault_over_hvac_p50_ratio": ratio,
            "vault_p50_ms": results["vault"]["p50"],
            "raw_hvac_p50_ms": results["vault"]["paired_p50"],
            "health_floor_calls_per_s": results["health"]["rps"],
            "local_server_cpu_ms_per_call": results["local"]["cpu_ms"],
            "health_server_cpu_ms_per_call": results["health"]["cpu_ms"],
            "vault_server_cpu_ms_per_call": results["vault"]["cpu_ms"],
        },
    )


if __name__ == "__main__":
    main()

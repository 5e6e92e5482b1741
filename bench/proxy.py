#!/usr/bin/env python3
"""Inference proxy overhead: the same load straight to the upstream and through the proxy, in one run.

Four processes: the fake upstream (20 ms per reply), metering + credentials, the proxy, and this
load generator. The load is a closed loop of N workers sending the same Messages request, first
with the official SDK straight to the fake, then through the proxy over gRPC (quotas, budget
leases, usage metering all on). Printed: latency p50/p99 of each path, the added latency, the
throughput ratio, the CPU each process spent per call, and the proxy's RSS.

With `--peer litellm` a third path runs in the same rounds: the LiteLLM proxy (1 worker, no
database: its cheapest set-up) in a throwaway virtualenv, its Anthropic /v1/messages endpoint
pointed at the same fake upstream, called with the same SDK request. Each server's CPU per call
comes from /proc (Bulkhead: proxy + metering/credentials; LiteLLM: its process tree), and the
ratios Bulkhead/LiteLLM are printed.

    python bench/proxy.py                  # ~40 s: concurrency 1 and 32
    python bench/proxy.py --quick          # a few seconds: smoke run
    python bench/proxy.py --peer litellm   # + LiteLLM (installs it on first use, a few minutes)
    python bench/proxy.py --replicas       # + an exact budget across 2 proxy replicas vs no budget

After the rounds, calls/s through a proxy of 1 and of 2 worker processes on one port
(BULKHEAD_INFERENCE_WORKERS, SO_REUSEPORT) are printed with their ratio (--no-workers skips it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import _litellm  # noqa: E402
from bench._figures import add_json_option, write_json  # noqa: E402
from services.inference.config import TRANSPORTS  # noqa: E402

TENANT = "t_bench"
MODEL = "claude-bench"
PINNED = "claude-bench-20250101"
PLATFORM_KEY = "sk-ant-bench-platform-key"


# ----- child processes -----


def _verifier():
    from shared.tokens import SigningKey, StaticKeySource, TokenVerifier

    key = SigningKey.from_private_bytes(os.environ["BENCH_KID"], bytes.fromhex(os.environ["BENCH_KEY"]))
    return TokenVerifier(StaticKeySource({key.kid: key.public_key}))


async def _serve_forever(announce: str) -> None:
    print("READY " + announce, flush=True)
    await asyncio.Event().wait()


async def _role_bare(delay: float) -> None:
    """A bare grpc.aio server (no interceptors, no proxy) whose one RPC waits `delay`: the latency a
    gRPC hop alone adds in front of an upstream that takes that long, on this machine."""
    import grpc

    from bulkhead.testing.v1 import echo_pb2, echo_pb2_grpc

    class Wait(echo_pb2_grpc.EchoServiceServicer):
        async def Echo(self, request, context):
            await asyncio.sleep(delay)
            return echo_pb2.EchoResponse(message=request.message)

    server = grpc.aio.server()
    echo_pb2_grpc.add_EchoServiceServicer_to_server(Wait(), server)  # type: ignore[abstract]  # Echo only
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await _serve_forever(f"127.0.0.1:{port}")


async def _role_fake(delay: float) -> None:
    from testkit.fake_anthropic import FakeAnthropic

    fake = await FakeAnthropic(delay=delay).start()
    await _serve_forever(fake.base_url)


async def _role_backends(tmp: str) -> None:
    from prometheus_client import CollectorRegistry

    from services.credentials.local_backend import LocalBackend
    from services.credentials.master_key import load_or_create_master_key
    from services.credentials.server import MIGRATIONS as CRED_MIGRATIONS
    from services.credentials.server import serve_credentials
    from services.metering.server import MIGRATIONS as METER_MIGRATIONS
    from services.metering.server import serve_metering
    from shared.db import Database

    verifier = _verifier()
    mdb = await Database.open(f"sqlite+aiosqlite:///{tmp}/metering.db", migrations=str(METER_MIGRATIONS))
    metering = await serve_metering(db=mdb, verifier=verifier, registry=CollectorRegistry())
    cdb = await Database.open(f"sqlite+aiosqlite:///{tmp}/credentials.db", migrations=str(CRED_MIGRATIONS))
    credentials = await serve_credentials(
        db=cdb,
        verifier=verifier,
        backend=LocalBackend(cdb, load_or_create_master_key(pathlib.Path(tmp) / "master.key")),
    )
    await _serve_forever(f"{metering.running.address} {credentials.running.address}")


async def _role_proxy() -> None:
    from services.inference.config import InferenceConfig
    from services.inference.server import start
    from services.inference.workers import WORKER_ENV
    from shared.process import freeze_startup_heap

    # A worker of --workers serves the address its parent drew (BULKHEAD_INFERENCE_LISTEN_ADDR).
    address = None if os.environ.get(WORKER_ENV) else "127.0.0.1:0"
    service = await start(InferenceConfig.from_env(os.environ), _verifier(), address=address)
    freeze_startup_heap()  # as main() does
    profile_to = os.environ.get("BENCH_PROFILE")
    if profile_to:  # --profile: where the proxy's CPU goes, written when the bench stops it
        import cProfile
        import signal

        if os.environ.get("ANTHROPIC_BASE_URL"):  # loaded on the first call otherwise: keep imports out of the profile
            from services.inference import sdk_http  # noqa: F401
            from services.inference.sdk_import import anthropic_sdk

            anthropic_sdk()  # as the proxy imports it
        profiler = cProfile.Profile()
        profiler.enable()
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, done.set)
        print("READY " + service.running.address, flush=True)
        await done.wait()
        profiler.disable()
        profiler.dump_stats(profile_to)
        return
    await _serve_forever(service.running.address)


# ----- load -----


async def _closed_loop(call, concurrency: int, seconds: float) -> tuple[list[float], float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - start


async def _bare_hop_floor(env: dict, args: argparse.Namespace) -> float:
    """Print what one bare gRPC hop adds at concurrency 1 in front of the same upstream wait: no
    proxy's added latency can be below it (the target is this + 0.2 ms)."""
    import grpc

    from bulkhead.testing.v1 import echo_pb2, echo_pb2_grpc

    bare, address = _spawn("bare", env, "--delay", str(args.delay))
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = echo_pb2_grpc.EchoServiceStub(channel)

            async def echo() -> None:
                await stub.Echo(echo_pb2.EchoRequest(message="x"))

            for _ in range(20):
                await echo()
            lat, _ = await _closed_loop(echo, 1, args.seconds / 2)
    finally:
        bare.terminate()
        bare.wait(timeout=10)
    added_ms = 1000 * (_pct(lat, 0.5) - args.delay)
    print(
        f"gRPC floor at concurrency 1: a bare grpc.aio server (no interceptors) whose handler waits the same "
        f"{args.delay * 1000:.0f} ms adds p50 {added_ms:+.2f} ms "
        f"(the proxy's added-latency target is this + 0.2 ms)"
    )
    return added_ms


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU the processes have used so far (all their threads)."""
    total = 0
    for pid in pids:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> tuple[float, float]:
    fields = dict(
        line.split(":", 1) for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _spawn(role: str, env: dict[str, str], *args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--role", role, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None  # stdout=PIPE
    line = proc.stdout.readline().strip()
    if not line.startswith("READY "):
        proc.kill()
        raise SystemExit(f"{role} did not start")
    return proc, line[len("READY ") :]


async def _budget_across_replicas(
    args, proxy_env: dict, first_addr: str, set_quota, md, request, procs: list, tmp: str
) -> float:
    """calls/s at concurrency 32 spread over 2 proxy replicas, for a tenant under a hard token budget
    (leases from metering shared by both) / a tenant with the same limits and no budget; same rounds."""
    import grpc

    from bulkhead.inference.v1 import inference_pb2_grpc
    from bulkhead.metering.v1 import metering_pb2 as mpb

    second_env = {**proxy_env, "BULKHEAD_DATA_DIR": f"{tmp}/replica-b", "BULKHEAD_INFERENCE_REPLICA_ID": "b"}
    os.makedirs(second_env["BULKHEAD_DATA_DIR"], exist_ok=True)
    second_env.pop("BENCH_PROFILE", None)
    second, second_addr = _spawn("proxy", second_env)
    procs.append(second)
    budget = mpb.Budget(
        unit=mpb.BUDGET_UNIT_TOKENS, limit=10_000_000_000, period=mpb.BUDGET_PERIOD_MONTH, mode=mpb.BUDGET_MODE_HARD
    )
    tenants = {"budget": "t_benchbudget", "none": "t_benchnobudget"}
    await set_quota(tenants["budget"], [budget])
    await set_quota(tenants["none"], [])
    channels = [grpc.aio.insecure_channel(a) for a in (first_addr, second_addr)]
    stubs = [inference_pb2_grpc.InferenceServiceStub(c) for c in channels]
    calls = {}
    for name, tenant in tenants.items():
        metadata, turn = md(tenant), [0]

        async def call(metadata=metadata, turn=turn) -> None:
            turn[0] += 1  # alternate replicas, as a round-robin channel over both would
            await stubs[turn[0] % 2].CreateMessage(request, metadata=metadata)

        calls[name] = call
    try:
        for call in calls.values():
            for _ in range(20):
                await call()
        done = {name: [0, 0.0] for name in calls}
        for _ in range(args.rounds):
            for name, call in calls.items():
                lat, elapsed = await _closed_loop(call, 32, args.seconds / args.rounds)
                done[name][0] += len(lat)
                done[name][1] += elapsed
    finally:
        for c in channels:
            await c.close()
    rates = {name: n / t for name, (n, t) in done.items()}
    print(
        f"2 replicas, concurrency 32: hard token budget {rates['budget']:.1f} calls/s, no budget "
        f"{rates['none']:.1f} calls/s, ratio {rates['budget'] / rates['none']:.3f} (target >= 0.9)"
    )
    return rates["budget"] / rates["none"]


async def _worker_scaling(args, proxy_env: dict, metadata, request, procs: list, tmp: str) -> dict[int, float]:
    """calls/s at concurrency 32 through proxies of 1 and 2 worker processes on one port (SO_REUSEPORT),
    in alternating rounds; the load spreads over 8 channels (one connection each), as many clients would."""
    import grpc

    from bulkhead.inference.v1 import inference_pb2_grpc

    counts = (1, 2)
    addresses = {}
    for n in counts:
        env = {
            **proxy_env,
            "BULKHEAD_INFERENCE_WORKERS": str(n),
            "BULKHEAD_INFERENCE_LISTEN_ADDR": "127.0.0.1:0",
            "BULKHEAD_DATA_DIR": f"{tmp}/workers-{n}",
        }
        env.pop("BENCH_PROFILE", None)
        os.makedirs(env["BULKHEAD_DATA_DIR"], exist_ok=True)
        proc, addresses[n] = _spawn("proxy", env)
        procs.append(proc)
    channels, calls = [], {}
    for n in counts:
        # A channel of its own subchannel pool: a connection of its own, so the kernel can hand it to any worker.
        own = [
            grpc.aio.insecure_channel(addresses[n], options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(8)
        ]
        channels += own
        stubs, turn = [inference_pb2_grpc.InferenceServiceStub(c) for c in own], [0]

        async def call(stubs=stubs, turn=turn) -> None:
            turn[0] += 1
            await stubs[turn[0] % len(stubs)].CreateMessage(request, metadata=metadata)

        calls[n] = call
    done = {n: [0, 0.0] for n in counts}
    try:
        for call in calls.values():
            for _ in range(40):
                await call()
        for _ in range(args.rounds):
            for n, call in calls.items():
                lat, elapsed = await _closed_loop(call, 32, args.seconds / args.rounds / 2)
                done[n][0] += len(lat)
                done[n][1] += elapsed
    finally:
        for c in channels:
            await c.close()
    rates = {n: count / spent for n, (count, spent) in done.items()}
    print(
        f"workers on one port (SO_REUSEPORT), concurrency 32 over 8 connections: 1 worker {rates[1]:.1f} calls/s, "
        f"2 workers {rates[2]:.1f} calls/s, scaling 1->2 {rates[2] / rates[1]:.2f}x on {os.cpu_count()} cores "
        f"(shared with the load generator, the fake upstream and metering)"
    )
    return rates


def _start_litellm(python: pathlib.Path, tmp: str, fake_url: str, master_key: str) -> tuple[subprocess.Popen, str]:
    config = pathlib.Path(tmp) / "litellm.yaml"
    config.write_text(_litellm.config_yaml(fake_url, PINNED, PLATFORM_KEY, master_key))
    print(f"starting LiteLLM {_litellm.VERSION} (1 worker, no database); its log: {tmp}/litellm.log", flush=True)
    return _litellm.start(python, config, log_to=pathlib.Path(tmp) / "litellm.log")


RATIOS = {
    "c1_added_p50": "c1_added_p50_ms",
    "c32_calls": "c32_calls_per_s",
    "c32_server_cpu": "c32_server_cpu_ms_per_call",
}
"""Figures compared Bulkhead/LiteLLM, by the short name of the ratio."""
SERVERS = {"proxy": ("proxy", "backends"), "litellm": ("litellm",)}
"""The server processes whose CPU each path's calls cost (direct has none between load and upstream)."""


def _figures(results: dict, cpu: dict, calls: dict, hop_ms: float, peak_mb: float) -> dict[str, float]:
    """The run's headline figures, by the names bench/all.py and the targets use."""

    def added(conc: int, path: str) -> float:
        return 1000 * (results[(conc, path)][0] - results[(conc, "direct")][0])

    def server_cpu(conc: int, path: str) -> float:
        return 1000 * sum(cpu[(conc, path)][role] for role in SERVERS[path]) / calls[(conc, path)]

    out = {"bare_hop_added_p50_ms": hop_ms, "proxy_peak_rss_mb": peak_mb}
    for path, name in (("proxy", "bulkhead"), ("litellm", "litellm")):
        if (1, path) in results:
            out[f"{name}_c1_added_p50_ms"] = added(1, path)
        if (32, path) in results:
            out[f"{name}_c32_calls_per_s"] = results[(32, path)][2]
            out[f"{name}_c32_server_cpu_ms_per_call"] = server_cpu(32, path)
            out[f"{name}_c32_throughput_ratio"] = results[(32, path)][2] / results[(32, "direct")][2]
    if (32, "proxy") in results:
        out["bulkhead_c32_proxy_only_cpu_ms_per_call"] = 1000 * cpu[(32, "proxy")]["proxy"] / calls[(32, "proxy")]
        out["direct_c32_calls_per_s"] = results[(32, "direct")][2]
    if "litellm_c32_calls_per_s" in out and "bulkhead_c32_calls_per_s" in out:
        for short, what in RATIOS.items():
            out[f"bulkhead_over_litellm_{short}_ratio"] = (
                out[f"bulkhead_{what}"] / out[f"litellm_{what}"] if out[f"litellm_{what}"] else float("nan")
            )
    return out


async def _bench(args: argparse.Namespace) -> None:
    import anthropic
    import grpc

    from bulkhead.inference.v1 import inference_pb2 as pb
    from bulkhead.inference.v1 import inference_pb2_grpc
    from bulkhead.metering.v1 import metering_pb2 as mpb
    from bulkhead.metering.v1 import metering_pb2_grpc
    from shared.tokens import SigningKey, TokenIssuer

    litellm_python = _litellm.ensure_venv(log=lambda line: print(line, flush=True)) if args.peer else None
    key = SigningKey.generate()
    issuer = TokenIssuer(key)
    tmp = tempfile.mkdtemp(prefix="bench-proxy-")
    env = {**os.environ, "BENCH_KID": key.kid, "BENCH_KEY": key.private_bytes().hex(), "PYTHONPATH": str(ROOT)}
    procs, peer = [], None
    try:
        fake, fake_url = _spawn("fake", env, "--delay", str(args.delay))
        procs.append(fake)
        backends, addrs = _spawn("backends", env, "--tmp", tmp)
        procs.append(backends)
        metering_addr, credentials_addr = addrs.split()
        proxy_env = {
            **env,
            "BULKHEAD_DATA_DIR": tmp,
            "BULKHEAD_METERING_ADDR": metering_addr,
            "BULKHEAD_CREDENTIALS_ADDR": credentials_addr,
            "BULKHEAD_MODEL_PROVIDER": "anthropic",
            "ANTHROPIC_API_KEY": PLATFORM_KEY,
            "ANTHROPIC_BASE_URL": fake_url,
            "BULKHEAD_INFERENCE_ALLOWED_MODELS": MODEL,
            "BULKHEAD_INFERENCE_PINNED_VERSIONS": f"{MODEL}={PINNED}",
            "BULKHEAD_INFERENCE_LEASE_TOKENS": "50000",
            "BULKHEAD_LOG_LEVEL": "WARNING",
        }
        if args.profile:
            proxy_env["BENCH_PROFILE"] = args.profile
        if args.transport:
            proxy_env["BULKHEAD_INFERENCE_UPSTREAM_TRANSPORT"] = args.transport
        transport = proxy_env.get("BULKHEAD_INFERENCE_UPSTREAM_TRANSPORT", "sdk")
        proxy, proxy_addr = _spawn("proxy", proxy_env)
        procs.append(proxy)
        await asyncio.sleep(1.0)  # started, no call yet: what an idle proxy holds
        idle_mb = _rss_mb(proxy.pid)[0]
        pids = {"load": [os.getpid()], "fake": [fake.pid], "proxy": [proxy.pid], "backends": [backends.pid]}
        clients = {}
        if litellm_python:
            master_key = "sk-" + os.urandom(16).hex()
            peer, peer_url = _start_litellm(litellm_python, tmp, fake_url, master_key)
            pids["litellm"] = _litellm.tree_pids(peer.pid)
            clients["litellm"] = anthropic.AsyncAnthropic(base_url=peer_url, api_key=master_key, max_retries=0)

        def md(tenant: str, scopes=("*",)):
            token, _ = issuer.issue(tenant_id=tenant, principal_id="p_bench", scopes=frozenset(scopes), ttl=3600)
            return (("authorization", f"Bearer {token}"), ("x-tenant-id", tenant))

        async def set_quota(tenant: str, budgets: list) -> None:
            async with grpc.aio.insecure_channel(metering_addr) as ch:
                await metering_pb2_grpc.MeteringServiceStub(ch).SetQuota(
                    mpb.SetQuotaRequest(
                        quota=mpb.Quota(
                            tenant_id=tenant,
                            requests_per_minute=10_000_000,
                            tokens_per_minute=10_000_000_000,
                            concurrent_calls=1000,
                            budgets=budgets,
                        )
                    ),
                    metadata=md("t_platform", ("platform.operator",)),
                )

        # Quotas and a budget large enough for the run, so every limit is checked on every call.
        await set_quota(
            TENANT, [mpb.Budget(unit=mpb.BUDGET_UNIT_TOKENS, limit=10_000_000_000, period=mpb.BUDGET_PERIOD_MONTH)]
        )

        text = "Summarise the quarterly numbers in one line please"
        clients["direct"] = anthropic.AsyncAnthropic(base_url=fake_url, api_key=PLATFORM_KEY, max_retries=0)
        channel = grpc.aio.insecure_channel(proxy_addr)
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        tenant_md = md(TENANT)
        request = pb.CreateMessageRequest(
            params=pb.MessageParams(
                model=MODEL,
                max_tokens=64,
                messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=pb.TextBlock(text=text))])],
            )
        )

        def via_sdk(client, model: str):
            async def call() -> None:
                await client.messages.create(
                    model=model,
                    max_tokens=64,
                    messages=[{"role": "user", "content": text}],
                    metadata={"user_id": "bh_bench"},
                )

            return call

        async def proxied() -> None:
            await stub.CreateMessage(request, metadata=tenant_md)

        paths = {"direct": via_sdk(clients["direct"], PINNED), "proxy": proxied}
        if "litellm" in clients:
            paths["litellm"] = via_sdk(clients["litellm"], _litellm.MODEL_ALIAS)
        for warm in paths.values():  # connections, caches, the first lease
            for _ in range(20):
                await warm()

        print(
            f"upstream delay {args.delay * 1000:.0f} ms, {args.seconds:.1f} s per path in {args.rounds} rounds, "
            f"quotas + leases + metering on, upstream transport {transport}; "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        )
        print(f"{'conc':>4} {'path':>7} {'calls':>6} {'p50 ms':>8} {'p99 ms':>8} {'calls/s':>8}")
        results = {}
        # CPU per process while each path runs. At concurrency 32 each path is bound by one event
        # loop (the load generator's SDK client on the direct path, the server on the others), so
        # these say which process sets the limit and what each server spends per call.
        cpu: dict[tuple[int, str], dict[str, float]] = {}
        calls: dict[tuple[int, str], int] = {}
        for conc in args.concurrency:
            # Alternate short rounds of the paths, so a change in background load hits all alike.
            samples: dict[str, tuple[list[float], float]] = {name: ([], 0.0) for name in paths}
            for _ in range(args.rounds):
                for name, call in paths.items():
                    before = {role: _cpu_seconds(ps) for role, ps in pids.items()}
                    lat, elapsed = await _closed_loop(call, conc, args.seconds / args.rounds)
                    samples[name] = (samples[name][0] + lat, samples[name][1] + elapsed)
                    spent = cpu.setdefault((conc, name), {})
                    for role, ps in pids.items():
                        spent[role] = spent.get(role, 0.0) + _cpu_seconds(ps) - before[role]
            for name, (lat, elapsed) in samples.items():
                calls[(conc, name)] = len(lat)
                results[(conc, name)] = (_pct(lat, 0.5), _pct(lat, 0.99), len(lat) / elapsed)
                p50, p99, tput = results[(conc, name)]
                print(f"{conc:>4} {name:>7} {len(lat):>6} {p50 * 1000:>8.2f} {p99 * 1000:>8.2f} {tput:>8.1f}")
        print()
        for conc in args.concurrency:
            d = results[(conc, "direct")]
            for name in list(paths)[1:]:
                p = results[(conc, name)]
                print(
                    f"concurrency {conc:>2} {name:>7}: added latency p50 {1000 * (p[0] - d[0]):+.2f} ms, "
                    f"p99 {1000 * (p[1] - d[1]):+.2f} ms, throughput ratio {name}/direct {p[2] / d[2]:.3f}"
                )
        print("CPU ms per call, by process: " + " ".join(pids))
        for (conc, name), spent in cpu.items():
            n = calls[(conc, name)]
            print(
                f"  c{conc:<3} {name:>7}: "
                + "  ".join(f"{role} {1000 * spent[role] / n:5.2f}" for role in pids)
                + f"  = {1000 * sum(spent.values()) / n:5.2f}"
            )
        rss, peak = _rss_mb(proxy.pid)
        print(
            f"proxy RSS idle {idle_mb:.0f} MB (target <= 100), after the load {rss:.0f} MB, peak {peak:.0f} MB "
            f"(target <= 150)"
        )
        hop_ms = await _bare_hop_floor(env, args)
        scaling = await _worker_scaling(args, proxy_env, tenant_md, request, procs, tmp) if args.workers else None
        replicas_ratio = (
            await _budget_across_replicas(args, proxy_env, proxy_addr, set_quota, md, request, procs, tmp)
            if args.replicas
            else None
        )
        await channel.close()
        for client in clients.values():
            await client.close()
        figures = _figures(results, cpu, calls, hop_ms, peak)
        figures["proxy_idle_rss_mb"] = idle_mb
        if replicas_ratio is not None:
            figures["budget_2_replicas_over_no_budget_ratio"] = replicas_ratio
        if scaling is not None:
            figures["workers_1_c32_calls_per_s"] = scaling[1]
            figures["workers_2_c32_calls_per_s"] = scaling[2]
            figures["workers_2_over_1_ratio"] = scaling[2] / scaling[1]
        if "litellm" in paths:
            print(f"\nBulkhead / LiteLLM ({_litellm.VERSION}, 1 worker, no database), same run, same upstream:")
            for what, label in (
                ("c1_added_p50", "added p50 at concurrency 1"),
                ("c32_calls", "calls/s at concurrency 32"),
                ("c32_server_cpu", "server CPU per call at concurrency 32"),
            ):
                print(f"  {label:<38} {figures[f'bulkhead_over_litellm_{what}_ratio']:8.3f}")
        print(json.dumps(figures, sort_keys=True))
        write_json(args.json, figures)
    finally:
        if peer is not None:
            _litellm.stop(peer)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few-second smoke run")
    parser.add_argument("--delay", type=float, default=0.02, help="upstream delay per reply, seconds")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per path and concurrency")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds the seconds are split into")
    parser.add_argument("--profile", metavar="FILE", help="write a cProfile of the proxy process to FILE")
    parser.add_argument(
        "--transport",
        choices=TRANSPORTS,
        help="the proxy's upstream transport (BULKHEAD_INFERENCE_UPSTREAM_TRANSPORT; default: "
        "the environment's, else sdk)",
    )
    parser.add_argument("--peer", choices=("litellm",), help="also run this proxy against the same upstream")
    parser.add_argument(
        "--no-workers",
        dest="workers",
        action="store_false",
        help="skip calls/s through 1 vs 2 worker processes on one port",
    )
    parser.add_argument(
        "--replicas", action="store_true", help="also: calls/s over 2 proxy replicas with a hard budget / with none"
    )
    add_json_option(parser)
    parser.add_argument("--role", choices=("fake", "backends", "proxy", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.concurrency = (1, 32)
    if args.role == "fake":
        asyncio.run(_role_fake(args.delay))
    elif args.role == "bare":
        asyncio.run(_role_bare(args.delay))
    elif args.role == "backends":
        asyncio.run(_role_backends(args.tmp))
    elif args.role == "proxy":
        from services.inference.config import InferenceConfig
        from services.inference.workers import WORKER_ENV, serve_workers
        from shared.process import run_loop

        config = InferenceConfig.from_env(os.environ)
        if config.workers > 1 and WORKER_ENV not in os.environ:  # the parent of --workers: as main() runs them

            def ready(proc: subprocess.Popen) -> bool:
                assert proc.stdout is not None  # started with stdout=PIPE
                return proc.stdout.readline().startswith(b"READY ")

            sys.exit(
                serve_workers(
                    config,
                    [sys.executable, __file__, "--role", "proxy"],
                    stdout=subprocess.PIPE,
                    ready=ready,
                    on_ready=lambda address: print("READY " + address, flush=True),
                )
            )
        run_loop(_role_proxy)  # the event loop main() runs on
    else:
        if args.quick:
            args.seconds, args.rounds = 1.0, 1
        asyncio.run(_bench(args))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The cost of the tenancy interceptor stack: the same no-op RPC through a bare grpc.aio server and
through the full stack (server span, token verify, tenant match, scope check, context, metrics).

Both servers run in one child process each and are measured in the same run; prints requests/s,
p50 and p99 for each and the overhead ratios. Then the calling side: this process's CPU per call to
the bare server through a plain channel, through shared.client.make_channel as a service calls its
peers (identity and read-your-writes in one interceptor, no span of its own when none is exported),
and through one interceptor per concern with OpenTelemetry's client span (how make_channel called
before issue 16's last round; the Python client still does). `--quick` runs a few seconds for smoke testing.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc

from bench._figures import add_json_option, write_json
from bulkhead.testing.v1 import echo_pb2, echo_pb2_grpc

KINDS = ("bare", "tenancy", "full")
"""bare grpc.aio; our interceptor with tracing off (no tracer provider); the production stack, spans recorded."""


class Noop(echo_pb2_grpc.EchoServiceServicer):
    """Answers at once: what is measured is the path around the handler."""

    async def Echo(self, request, context):
        return echo_pb2.EchoResponse(message=request.message)


def _serve(kind: str, port_queue, key_bytes: bytes, kid: str) -> None:
    async def run() -> None:
        if kind in ("bare", "tenancy"):
            interceptors = []
            if kind == "tenancy":  # our interceptor with no tracer provider: spans are not recorded
                from shared.auth import TenancyInterceptor
                from shared.tokens import SigningKey, StaticKeySource, TokenVerifier

                key = SigningKey.from_private_bytes(kid, key_bytes)
                interceptors = [
                    TenancyInterceptor(TokenVerifier(StaticKeySource({kid: key.public_key})), service="bench")
                ]
            server = grpc.aio.server(interceptors=interceptors)
            echo_pb2_grpc.add_EchoServiceServicer_to_server(Noop(), server)  # type: ignore[abstract]  # Echo only
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
        else:
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

            from shared.server import Binding, serve
            from shared.telemetry import setup_telemetry
            from shared.tokens import SigningKey, StaticKeySource, TokenVerifier

            class Discard(SpanExporter):
                def export(self, spans):
                    return SpanExportResult.SUCCESS

            setup_telemetry("bench", extra_processors=(SimpleSpanProcessor(Discard()),))
            key = SigningKey.from_private_bytes(kid, key_bytes)
            verifier = TokenVerifier(StaticKeySource({kid: key.public_key}))
            running = await serve(
                name="bench",
                verifier=verifier,
                bindings=[
                    Binding(
                        echo_pb2_grpc.add_EchoServiceServicer_to_server,
                        Noop(),  # type: ignore[abstract]  # Echo only
                        echo_pb2.DESCRIPTOR.services_by_name["EchoService"],
                    )
                ],
            )
            server, port = running.server, running.port
        port_queue.put(port)
        await server.wait_for_termination()

    asyncio.run(run())


async def _measure(address: str, metadata, seconds: float, concurrency: int) -> tuple[list[float], float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        request = echo_pb2.EchoRequest(message="x")
        for _ in range(200):  # warm up: connection, caches, token verification
            await stub.Echo(request, metadata=metadata)
        latencies: list[float] = []
        stop_at = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                await stub.Echo(request, metadata=metadata)
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, len(latencies) / (time.perf_counter() - started)


CLIENTS = ("plain", "mesh", "layered")


def _client_channel(kind: str, address: str, token: str) -> grpc.aio.Channel:
    from shared import telemetry
    from shared.client import ReadYourWrites, StaticCredentials, make_channel

    credentials = StaticCredentials(token=token, tenant_id="t_bench")
    if kind == "mesh":
        return make_channel(address, credentials=credentials, tls=None)
    if kind == "layered":
        interceptors = [*telemetry.client_interceptors(), *credentials.interceptors(), *ReadYourWrites().interceptors()]
        return grpc.aio.insecure_channel(address, interceptors=interceptors)
    return grpc.aio.insecure_channel(address)


async def _client_cpu(kind: str, address: str, token: str, calls: int, concurrency: int) -> float:
    """This process's CPU per call (µs), `calls` calls at `concurrency`."""
    async with _client_channel(kind, address, token) as channel:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        request = echo_pb2.EchoRequest(message="x")
        for _ in range(200):
            await stub.Echo(request)

        async def worker(n: int) -> None:
            for _ in range(n):
                await stub.Echo(request)

        started = time.process_time()
        await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
        return (time.process_time() - started) / (calls // concurrency * concurrency) * 1e6


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--quick", action="store_true", help="1 s x 1 round")
    add_json_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rounds = 1.0, 1

    from shared.tokens import SigningKey, TokenIssuer

    key = SigningKey.generate()
    token, _ = TokenIssuer(key).issue(tenant_id="t_bench", principal_id="p_bench", scopes={"testing.echo"}, ttl=3600)
    md_full = (("authorization", f"Bearer {token}"), ("x-tenant-id", "t_bench"))
    ctx = multiprocessing.get_context("spawn")
    addresses, procs = {}, []
    for kind in KINDS:
        q = ctx.Queue()
        p = ctx.Process(target=_serve, args=(kind, q, key.private_bytes(), key.kid), daemon=True)
        p.start()
        procs.append(p)
        addresses[kind] = f"127.0.0.1:{q.get(timeout=30)}"

    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    client_cpu: dict[str, list[float]] = {}
    try:
        for _ in range(args.rounds):
            for concurrency in (1, 16):
                for kind in KINDS:  # alternate so drift affects all alike
                    lat, rps = asyncio.run(
                        _measure(addresses[kind], md_full if kind != "bare" else (), args.seconds, concurrency)
                    )
                    results.setdefault((kind, concurrency), []).append((_pct(lat, 50), _pct(lat, 99), rps))
            for client in CLIENTS:
                calls = 2_000 if args.quick else 10_000
                spent = asyncio.run(_client_cpu(client, addresses["bare"], token, calls, 16))
                client_cpu.setdefault(client, []).append(spent)
    finally:
        for p in procs:
            p.terminate()

    print(f"{'stack':<7} {'conc':>4} {'req/s':>9} {'p50 µs':>8} {'p99 µs':>8}")
    summary = {}
    for (kind, concurrency), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        p50 = statistics.median(r[0] for r in runs)
        p99 = statistics.median(r[1] for r in runs)
        rps = statistics.median(r[2] for r in runs)
        summary[(kind, concurrency)] = (p50, p99, rps)
        print(f"{kind:<7} {concurrency:>4} {rps:>9.0f} {p50:>8.0f} {p99:>8.0f}")
    figures = {}
    for concurrency in (1, 16):
        bare = summary[("bare", concurrency)]
        for kind in KINDS[1:]:
            other = summary[(kind, concurrency)]
            print(
                f"concurrency {concurrency:>2}: {kind:>7}/bare  p50 {other[0] / bare[0]:.2f}x   "
                f"p99 {other[1] / bare[1]:.2f}x   throughput {other[2] / bare[2]:.2f}x"
            )
        full = summary[("full", concurrency)]
        figures[f"full_c{concurrency}_added_p50_ms"] = (full[0] - bare[0]) / 1000
        figures[f"full_over_bare_c{concurrency}_throughput_ratio"] = full[2] / bare[2]
    cpu = {client: statistics.median(runs) for client, runs in client_cpu.items()}
    print("\ncalling side, concurrency 16, this process's CPU per call:")
    for client in CLIENTS:
        print(f"  {client:<8} {cpu[client]:6.1f} µs   (+{cpu[client] - cpu['plain']:5.1f} µs over a plain channel)")
    print(f"  make_channel / layered interceptors: {cpu['mesh'] / cpu['layered']:.2f}x")
    figures |= {f"client_{client}_cpu_us_per_call": cpu[client] for client in CLIENTS}
    figures["client_mesh_over_layered_cpu_ratio"] = cpu["mesh"] / cpu["layered"]
    write_json(args.json, figures)


if __name__ == "__main__":
    main()

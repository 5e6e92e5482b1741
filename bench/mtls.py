#!/usr/bin/env python3
"""What mTLS between services costs, next to plaintext measured in the same run.

A child process runs the production server (shared.server.serve, tenancy interceptor, the echo
servicer) twice: once plaintext, once with mTLS from `bulkhead certs dev`. This process is the
client (shared.client.make_channel, with and without TLS). Per mode it measures:

- unary latency on a warm channel (sequential calls: p50/p99);
- throughput with concurrent callers on one channel;
- connection setup: a fresh channel per call (TCP + HTTP/2, plus the TLS handshake with mTLS).

Prints figures and the ratios mTLS / plaintext. `--quick` runs a few seconds for smoke testing.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._figures import add_json_option, write_json

TENANT = "t_bench"


def _serve(pki: str | None, key_pem: bytes, queue, stop) -> None:
    """Child process: the echo service behind the production interceptors, TLS when pki is set."""

    async def run() -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        from shared.server import serve
        from shared.tls import TlsConfig
        from shared.tokens import StaticKeySource, TokenVerifier
        from testkit.echo import echo_binding

        private = load_pem_private_key(key_pem, None)
        if not isinstance(private, Ed25519PrivateKey):
            raise TypeError("the bench's signing key must be Ed25519")
        public = private.public_key()
        verifier = TokenVerifier(StaticKeySource({"bench": public}))
        tls = TlsConfig.from_dir(pki, "identity") if pki else None
        running = await serve(name="echo", bindings=[echo_binding()], verifier=verifier, address="127.0.0.1:0", tls=tls)
        queue.put(running.port)
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await running.stop(0)

    asyncio.run(run())


def _token() -> tuple[str, bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    import jwt

    now = int(time.time())
    token = jwt.encode(
        {
            "iss": "bulkhead-identity",
            "sub": "p_bench",
            "tid": TENANT,
            "tier": "pooled",
            "scope": "*",
            "iat": now,
            "exp": now + 3600,
            "jti": "bench",
        },
        key,
        algorithm="EdDSA",
        headers={"kid": "bench"},
    )
    return token, pem


async def _measure(port: int, tls, token: str, *, calls: int, concurrency: int, connects: int) -> dict[str, float]:
    from bulkhead.testing.v1 import echo_pb2, echo_pb2_grpc
    from shared.client import StaticCredentials, make_channel

    creds = StaticCredentials(token, TENANT)
    target = f"localhost:{port}"
    request = echo_pb2.EchoRequest(message="x" * 64)
    out: dict[str, float] = {}
    async with make_channel(target, credentials=creds, tls=tls) as channel:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        for _ in range(50):  # warm up: connection, interceptors, JIT-ish caches
            await stub.Echo(request)
        samples = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await stub.Echo(request)
            samples.append(time.perf_counter() - t0)
        samples.sort()
        out["p50_ms"] = statistics.median(samples) * 1e3
        out["p99_ms"] = samples[int(len(samples) * 0.99) - 1] * 1e3

        async def worker(n: int) -> None:
            for _ in range(n):
                await stub.Echo(request)

        per = max(calls // concurrency, 1)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(per) for _ in range(concurrency)))
        out["rps"] = per * concurrency / (time.perf_counter() - t0)
    samples = []
    for _ in range(connects):
        t0 = time.perf_counter()
        async with make_channel(target, credentials=creds, tls=tls) as fresh:
            await echo_pb2_grpc.EchoServiceStub(fresh).Echo(request)
        samples.append(time.perf_counter() - t0)
    out["connect_ms"] = statistics.median(samples) * 1e3
    return out


def _run_mode(pki: str | None, token: str, key_pem: bytes, **sizes: int) -> dict[str, float]:
    from shared.tls import TlsConfig

    ctx = multiprocessing.get_context("spawn")
    queue, stop = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=_serve, args=(pki, key_pem, queue, stop), daemon=True)
    child.start()
    try:
        port = queue.get(timeout=60)
        tls = TlsConfig.from_dir(pki, "client") if pki else None
        return asyncio.run(_measure(port, tls, token, **sizes))
    finally:
        stop.set()
        child.join(10)
        if child.is_alive():
            child.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few seconds, for smoke testing")
    add_json_option(parser)
    args = parser.parse_args()
    sizes = (
        {"calls": 300, "concurrency": 8, "connects": 20}
        if args.quick
        else {"calls": 4000, "concurrency": 32, "connects": 200}
    )

    from bulkhead_cli.certs import write_dev_certs

    token, key_pem = _token()
    with tempfile.TemporaryDirectory(prefix="bench-mtls-") as tmp:
        write_dev_certs(tmp, names=("identity", "client"))
        plain = _run_mode(None, token, key_pem, **sizes)
        mtls = _run_mode(tmp, token, key_pem, **sizes)

    print(f"{'':36}{'plaintext':>12}{'mTLS':>12}{'mTLS/plain':>12}")
    rows = [
        ("unary p50 (ms)", "p50_ms"),
        ("unary p99 (ms)", "p99_ms"),
        (f"throughput (calls/s, {sizes['concurrency']} callers)", "rps"),
        ("new channel + call (ms)", "connect_ms"),
    ]
    for label, key in rows:
        print(f"{label:36}{plain[key]:>12.2f}{mtls[key]:>12.2f}{mtls[key] / plain[key]:>12.2f}")
    write_json(
        args.json, {f"mtls_over_plain_{key.removesuffix('_ms')}_ratio": mtls[key] / plain[key] for _, key in rows}
    )


if __name__ == "__main__":
    main()

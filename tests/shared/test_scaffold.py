"""The one service scaffold: lifecycle on an exit stack, one ConfigError, TLS from the injected environment."""

from __future__ import annotations

import ast
import asyncio
import socket
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bulkhead_cli.certs import write_dev_certs
from services.credentials.config import Config as CredentialsConfig
from services.identity.config import IdentityConfig
from services.inference.config import InferenceConfig
from services.metering.config import MeteringConfig
from services.orchestrator.config import OrchestratorConfig
from services.state.config import StateConfig
from shared.config import ConfigError, EnvReader, ServiceConfig
from shared.db import Database
from shared.scaffold import Service, Startup
from shared.server import RunningServer, serve
from shared.tls import ENV_VARS, TlsConfig, channel_credentials
from testkit.echo import echo_binding
from testkit.tokens import TestTokens

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("identity", "credentials", "state", "inference", "orchestrator", "metering")


# -- lifecycle ------------------------------------------------------------------------------


class Thing:
    """Something opened; records when it was closed and whether the server was still serving then."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    async def close(self) -> None:
        self.log.append(self.name)


async def test_a_start_failing_half_way_closes_what_it_opened_newest_first():
    """Everything registered before the failure is closed, in reverse order; nothing after it was opened."""
    closed: list[str] = []
    with pytest.raises(RuntimeError, match="peer refused"):
        async with Startup() as up:
            up.closing(Thing("database", closed))
            up.closing(Thing("channel", closed))
            raise RuntimeError("peer refused")
    assert closed == ["channel", "database"]


async def test_stop_stops_the_server_first_then_closes_the_rest_in_reverse():
    """Service.stop(grace): the server stops taking calls before anything it uses is closed."""
    tokens, closed, serving_at_close = TestTokens(), [], []

    class Probe(Thing):
        async def close(self) -> None:
            serving_at_close.append(not running.stopped)
            await super().close()

    async with Startup() as up:
        up.closing(Probe("database", closed))
        up.closing(Probe("channel", closed))
        running = up.serving(await _echo_server(tokens))
        service = Service(running=running, stack=up.stack)
    assert closed == []  # a start that succeeded hands its stack to the service
    await service.stop(0)
    assert closed == ["channel", "database"] and serving_at_close == [False, False]
    await service.stop(0)  # twice is harmless
    assert closed == ["channel", "database"]


async def test_a_failure_after_serving_stops_the_server_and_its_background_work():
    """A start that fails once the server listens stops it (the port is free again) and the started work."""
    tokens = TestTokens()

    class Work:
        task: asyncio.Task | None = None

        def start(self) -> None:
            self.task = asyncio.get_running_loop().create_task(asyncio.sleep(3600))

        async def stop(self) -> None:
            assert self.task is not None
            self.task.cancel()

    work = Work()
    with pytest.raises(RuntimeError):
        async with Startup() as up:
            running = up.serving(
                await serve(name="echo", bindings=[echo_binding()], verifier=tokens.verifier, tls=None)
            )
            up.started(work)
            raise RuntimeError("retention sweeper could not start")
    assert running.stopped
    await asyncio.sleep(0)
    assert work.task is not None and work.task.cancelled()
    with socket.socket() as probe:  # the port was released
        probe.bind(("127.0.0.1", running.port))


async def _echo_server(tokens: TestTokens) -> RunningServer:
    return await serve(name="echo", bindings=[echo_binding()], verifier=tokens.verifier, tls=None)


def _held_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


async def test_metering_start_that_cannot_listen_closes_its_database_and_channels(tmp_path, monkeypatch):
    """serve() raises (the port is taken): the database metering opened is closed, no background task is left."""
    import services.metering.server as metering_server

    opened: list[Database] = []
    closed: list[str] = []
    real_open = metering_server.open_service_database

    async def spy_open(*args, **kwargs):
        db = await real_open(*args, **kwargs)
        db.on_close(lambda: _record(closed, "database"))
        opened.append(db)
        return db

    monkeypatch.setattr(metering_server, "open_service_database", spy_open)
    config = MeteringConfig.from_env({"BULKHEAD_DATA_DIR": str(tmp_path)})
    before = set(asyncio.all_tasks())
    with _held_port() as held:
        address = f"127.0.0.1:{held.getsockname()[1]}"
        with pytest.raises((OSError, RuntimeError), match=r"bind|listen"):
            await metering_server.start(config, TestTokens().verifier, address=address)
    assert len(opened) == 1 and closed == ["database"]
    await asyncio.sleep(0)
    assert {t for t in asyncio.all_tasks() if not t.done()} - before == set()


async def _record(log: list[str], name: str) -> None:
    log.append(name)


async def test_state_start_whose_peer_channel_fails_closes_its_database(tmp_path, monkeypatch):
    """The credentials channel cannot be built (its TLS files are missing): the database state opened is closed."""
    import services.state.server as state_server

    closed: list[str] = []
    real_open = state_server.open_service_database

    async def spy_open(*args, **kwargs):
        db = await real_open(*args, **kwargs)
        db.on_close(lambda: _record(closed, "database"))
        return db

    monkeypatch.setattr(state_server, "open_service_database", spy_open)
    missing = tmp_path / "nowhere"
    env = {
        "BULKHEAD_DATA_DIR": str(tmp_path),
        "BULKHEAD_STATE_ENCRYPTION": "credentials",
        "BULKHEAD_TLS_CA": str(missing / "ca.pem"),
        "BULKHEAD_TLS_CERT": str(missing / "state.pem"),
        "BULKHEAD_TLS_KEY": str(missing / "state-key.pem"),
    }
    with pytest.raises(ConfigError, match="cannot read TLS"):
        await state_server.start(StateConfig.from_env(env), TestTokens().verifier, address="127.0.0.1:0")
    assert closed == ["database"]


# -- one ConfigError ------------------------------------------------------------------------

BAD_VALUES = [
    (StateConfig, "BULKHEAD_STATE_MAX_EVENT_BYTES", "big"),
    (StateConfig, "BULKHEAD_STATE_ENCRYPTION", "rot13"),
    (CredentialsConfig, "BULKHEAD_VAULT_TENANT_TOKEN_TTL", "soon"),
    (CredentialsConfig, "BULKHEAD_SECRETS_BACKEND", "s3"),
    (IdentityConfig, "BULKHEAD_REVOCATION_POLL_SECONDS", "often"),
    (IdentityConfig, "BULKHEAD_IDENTITY_METRICS_PORT", "70000"),
    (InferenceConfig, "BULKHEAD_INFERENCE_WORKERS", "99"),
    (InferenceConfig, "BULKHEAD_MODEL_PROVIDER", "openai"),
    (OrchestratorConfig, "BULKHEAD_ORCHESTRATOR_MAX_CONCURRENT", "lots"),
    (OrchestratorConfig, "BULKHEAD_ORCHESTRATOR_LEASE_SECONDS", "0"),
    (MeteringConfig, "BULKHEAD_METERING_SWEEP_INTERVAL", "hourly"),
    (MeteringConfig, "BULKHEAD_METERING_PRICE_CACHE_SECONDS", "-1"),
]


@pytest.mark.parametrize(("config", "variable", "value"), BAD_VALUES, ids=[v for _, v, _ in BAD_VALUES])
def test_a_bad_value_is_a_config_error_naming_the_variable(config, variable: str, value: str):
    """Every service's config fails the same way: ConfigError (a ValueError), naming the variable and the value."""
    with pytest.raises(ConfigError) as err:
        config.from_env({variable: value})
    assert variable in str(err.value) and value in str(err.value)
    assert isinstance(err.value, ValueError)


def test_a_choice_error_lists_the_allowed_values():
    """The message says what would have been accepted."""
    with pytest.raises(ConfigError, match=r"BULKHEAD_STATE_ENCRYPTION must be credentials, local or off, not 'rot13'"):
        StateConfig.from_env({"BULKHEAD_STATE_ENCRYPTION": "rot13"})
    with pytest.raises(ConfigError, match=r"BULKHEAD_INFERENCE_WORKERS must be 1\.\.64, not 99"):
        InferenceConfig.from_env({"BULKHEAD_INFERENCE_WORKERS": "99"})


def test_the_vault_backend_without_a_token_is_a_config_error():
    """credentials' config refuses like the others (it was a FailedPrecondition, a gRPC status, before)."""
    with pytest.raises(ConfigError, match="BULKHEAD_VAULT_TOKEN"):
        CredentialsConfig.from_env({"BULKHEAD_SECRETS_BACKEND": "vault"})


def test_env_reader_defaults_bounds_and_flags():
    """Unset or empty gives the default; bounds and flag spellings are checked."""
    read = EnvReader({"N": "7", "EMPTY": "", "ON": "yes", "OFF": "0", "ODD": "maybe"}, "")
    assert read.int("N", 1, min=1, max=10) == 7 and read.int("EMPTY", 3) == 3 and read.int("UNSET", 4) == 4
    assert read.flag("ON") is True and read.flag("OFF") is False and read.flag("UNSET", True) is True
    assert read.positive("N", 1.0) == 7.0 and isinstance(read.positive("N", 1.0), float)
    with pytest.raises(ConfigError, match="N must be at most 5, not 7"):
        read.int("N", 1, max=5)
    with pytest.raises(ConfigError, match="ODD must be 1 or 0"):
        read.flag("ODD")


# -- TLS from the injected environment ------------------------------------------------------


@pytest.fixture
def no_tls_in_process_env(monkeypatch):
    """os.environ has no BULKHEAD_TLS_*: whatever TLS a service uses came from the env it was given."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("missing", ENV_VARS)
def test_half_set_tls_in_the_injected_env_is_a_config_error(no_tls_in_process_env, missing: str):
    """Two of the three variables in the given env fail, though the process environment has none."""
    env = {name: f"/x/{name.lower()}.pem" for name in ENV_VARS if name != missing}
    with pytest.raises(ConfigError, match=missing):
        ServiceConfig.from_env("state", env)


async def test_a_service_serves_mtls_when_its_injected_env_says_so(tmp_path, no_tls_in_process_env):
    """state started from an env with the three variables listens with mTLS; a plaintext client is refused."""
    from services.state.server import start

    issued = {i.name: i for i in write_dev_certs(tmp_path / "pki", names=["state", "orchestrator"])}
    env = {
        "BULKHEAD_DATA_DIR": str(tmp_path),
        "BULKHEAD_TLS_CA": str(tmp_path / "pki" / "ca.pem"),
        "BULKHEAD_TLS_CERT": str(issued["state"].cert),
        "BULKHEAD_TLS_KEY": str(issued["state"].key),
    }
    config = StateConfig.from_env(env)
    assert config.service.tls == TlsConfig.from_env(env)
    service = await start(config, TestTokens().verifier, address="localhost:0")
    try:
        client = TlsConfig.from_dir(tmp_path / "pki", "orchestrator")
        async with grpc.aio.secure_channel(service.address, channel_credentials(client)) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(service.address) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await service.stop(0)


# -- the same shape -------------------------------------------------------------------------


def _tree(svc: str) -> ast.Module:
    path = ROOT / "services" / svc / "server.py"
    return ast.parse(path.read_text(), filename=str(path))


def _functions(tree: ast.Module) -> dict[str, ast.AsyncFunctionDef | ast.FunctionDef]:
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


@pytest.mark.parametrize("svc", SERVICES)
def test_every_server_py_has_the_same_short_shape(svc: str):
    """Docstring, MIGRATIONS, serve_<svc>, start, main(env); short."""
    tree = _tree(svc)
    assert ast.get_docstring(tree), "a module docstring"
    assigned = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert "MIGRATIONS" in assigned
    functions = _functions(tree)
    assert f"serve_{svc}" in functions and "start" in functions and "main" in functions
    main = functions["main"]
    assert isinstance(main, ast.AsyncFunctionDef) and [a.arg for a in main.args.args] == ["env"]
    assert ast.unparse(main.args.defaults[0]) == "os.environ"
    assert "run_service" in ast.unparse(main), "main runs through the one lifecycle"
    assert len((ROOT / "services" / svc / "server.py").read_text().splitlines()) <= 230


@pytest.mark.parametrize("svc", SERVICES)
def test_no_holder_keeps_its_own_close_list(svc: str):
    """The holder subclasses Service and closes nothing itself: no stop/close, no list or dict of things to close."""
    tree = _tree(svc)
    holders = [n for n in tree.body if isinstance(n, ast.ClassDef) and "Service" in map(ast.unparse, n.bases)]
    assert len(holders) == 1, "one holder, a Service"
    (holder,) = holders
    methods = {n.name for n in holder.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    assert not methods & {"stop", "close", "aclose"}
    annotations = [ast.unparse(n.annotation) for n in holder.body if isinstance(n, ast.AnnAssign)]
    assert not [a for a in annotations if a.startswith(("list", "dict", "tuple"))], annotations
    others = [n.name for n in tree.body if isinstance(n, ast.ClassDef) and n is not holder]
    assert others in ([], ["Peers"]), others  # orchestrator's Peers is a value, not a holder


def _calls_without_tls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and ast.unparse(node.func).split(".")[-1] in ("make_channel", "serve")
        and "tls" not in {k.arg for k in node.keywords}
    ]


def test_no_service_path_falls_back_to_the_process_env_for_tls():
    """Services, the scaffold and the helpers they open channels through always say which TLS (the config's)."""
    paths = [
        *ROOT.glob("services/*/*.py"),
        *(ROOT / "shared" / f for f in ("scaffold.py", "placement.py", "retention.py")),
    ]
    assert [gap for path in paths for gap in _calls_without_tls(path)] == []


# -- main(env) ------------------------------------------------------------------------------


@pytest.mark.parametrize("svc", ["identity", "state"])
def test_main_serves_until_sigterm_then_stops_cleanly(tmp_path, svc: str):
    """python -m services.<svc>: listens, and on SIGTERM stops the server and closes the rest, exiting 0."""
    import os

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BULKHEAD_")},
        "PYTHONPATH": str(ROOT),
        "BULKHEAD_DATA_DIR": str(tmp_path),
        f"BULKHEAD_{svc.upper()}_ADDR": f"127.0.0.1:{port}",
        f"BULKHEAD_{svc.upper()}_METRICS_PORT": "0",
    }
    log = tmp_path / "out.log"
    _sigterm_once_it_says(["-m", f"services.{svc}"], env, log, f"listening on 127.0.0.1:{port}")
    assert "Traceback" not in log.read_text()


def _sigterm_once_it_says(args: list[str], env: dict[str, str], log, marker: str) -> None:
    """Run python args, SIGTERM it once its output holds marker, and check it exits 0 (output in log)."""
    import signal
    import subprocess
    import sys
    import time

    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, *args], env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 30
        while marker not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


_NEVER_READY = """
import asyncio

from shared.config import ServiceConfig
from shared.scaffold import run_service


class Opened:
    async def close(self):
        print("closed what start opened", flush=True)


async def never_ready(up):
    up.closing(Opened())
    print("starting", flush=True)
    await asyncio.Event().wait()  # e.g. waiting for a database that does not answer


asyncio.run(run_service(ServiceConfig.from_env("state"), never_ready))
print("exited", flush=True)
"""


def test_sigterm_while_starting_stops_the_start_and_closes_what_it_opened(tmp_path):
    """A SIGTERM during start() (the signal handlers are in place before it) cancels the start, closes what it
    had opened and exits 0, instead of the signal's default (killed) or waiting for a start that may never end."""
    import os

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BULKHEAD_")},
        "PYTHONPATH": str(ROOT),
        "BULKHEAD_DATA_DIR": str(tmp_path),
        "BULKHEAD_STATE_METRICS_PORT": "0",
    }
    log = tmp_path / "out.log"
    _sigterm_once_it_says(["-c", _NEVER_READY], env, log, "starting")
    text = log.read_text()
    assert "closed what start opened" in text and "stopped while starting" in text and "exited" in text, text
    assert "Traceback" not in text

"""The TypeScript client, generated from the protos with buf, against the real Python services.

Builds clients/ts (npm ci when needed, `buf generate`, tsc), starts all six services as
separate processes on free ports (embedded defaults: SQLite, local secrets, offline model),
then runs the Node test suite (node:test) with their addresses and the operator key.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import shutil
import subprocess

import pytest

from bulkhead_cli.supervisor import Supervisor, available_services
from shared.config import SERVICES
from testkit.procs import free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "ts"
MESH_SUITE = ("smoke.test.js", "mesh.test.js")
MESH_TESTS = 6
"""The two descriptor smoke tests (auth rules, the error-reason catalog) and the four mesh tests."""
MTLS_TESTS = 2

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not all(shutil.which(t) for t in ("node", "npm", "buf")), reason="needs node, npm and buf"),
]


def _run(*args: str, timeout: float) -> None:
    result = subprocess.run(args, cwd=CLIENT, check=False, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def built_client() -> pathlib.Path:
    """clients/ts installed from package-lock.json, generated from protos/ and compiled."""
    installed = CLIENT / "node_modules" / ".package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < (CLIENT / "package-lock.json").stat().st_mtime:
        _run("npm", "ci", "--no-audit", "--no-fund", timeout=300)
    _run("npm", "run", "generate", timeout=120)
    _run("npm", "run", "build", timeout=120)
    return CLIENT / "dist" / "test"


def _mesh_env(data_dir: pathlib.Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BULKHEAD_", "ANTHROPIC_", "BAO_", "VAULT_"))}
    env.update(
        BULKHEAD_DATA_DIR=str(data_dir),
        BULKHEAD_SECRETS_BACKEND="local",
        BULKHEAD_MODEL_PROVIDER="offline",
        BULKHEAD_LOG_LEVEL="WARNING",
    )
    for svc in SERVICES:
        env[f"BULKHEAD_{svc.upper()}_ADDR"] = f"127.0.0.1:{free_port()}"
        env[f"BULKHEAD_{svc.upper()}_METRICS_PORT"] = "0"
    return env


def _tap_count(output: str, field: str) -> int:
    match = re.search(rf"^# {field} (\d+)$", output, re.MULTILINE)
    assert match, f"no '# {field}' line in the node output:\n{output[-3000:]}"
    return int(match.group(1))


async def test_typescript_client_against_the_running_mesh(built_client: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """Node issues tokens, stores a secret, runs a team and reads usage, and is refused across tenants."""
    assert available_services() == list(SERVICES)
    env = _mesh_env(tmp_path / "data")
    logs: list[str] = []
    supervisor = Supervisor(list(SERVICES), env, echo=logs.append)
    try:
        await supervisor.start(timeout=90)
        operator_key = (tmp_path / "data" / "operator.key").read_text().strip()
        returncode, output = await _node(built_client, MESH_SUITE, {**env, "BULKHEAD_OPERATOR_KEY": operator_key})
    finally:
        await supervisor.stop()
    # identity prints the operator key once on first start, by design: keep it out of failure output.
    shown = [line for line in logs if operator_key not in line]
    context = f"{output[-4000:]}\n--- service logs ---\n" + "\n".join(shown[-40:])
    _assert_all_passed(returncode, output, MESH_TESTS, context)
    assert operator_key not in output


async def test_typescript_client_over_mtls(built_client: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """Against identity serving mTLS: Node with a CA-signed cert is served, without one it is refused."""
    import io

    from bulkhead_cli.certs import write_dev_certs
    from services.identity.config import IdentityConfig
    from services.identity.server import start
    from shared.tls import TlsConfig

    write_dev_certs(tmp_path / "pki", names=("identity", "client"))
    address = f"127.0.0.1:{free_port()}"
    env = {
        **_mesh_env(tmp_path / "data"),
        "BULKHEAD_IDENTITY_ADDR": address,
        **TlsConfig.from_dir(tmp_path / "pki", "identity").as_env(),
    }
    announced = io.StringIO()
    app = await start(IdentityConfig.from_env(env), announce=announced)
    try:
        operator_key = (tmp_path / "data" / "operator.key").read_text().strip()
        client = TlsConfig.from_dir(tmp_path / "pki", "client")
        node_env = {
            **_mesh_env(tmp_path / "unused"),
            "BULKHEAD_IDENTITY_ADDR": f"localhost:{address.rpartition(':')[2]}",
            "BULKHEAD_OPERATOR_KEY": operator_key,
            "BULKHEAD_TEST_TLS_CA": str(client.ca),
            "BULKHEAD_TEST_TLS_CERT": str(client.cert),
            "BULKHEAD_TEST_TLS_KEY": str(client.key),
        }
        returncode, output = await _node(built_client, ("mtls.test.js",), node_env)
    finally:
        await app.close()
    _assert_all_passed(returncode, output, MTLS_TESTS, output[-4000:])


async def _node(tests_dir: pathlib.Path, files: tuple[str, ...], env: dict[str, str]) -> tuple[int, str]:
    node = await asyncio.create_subprocess_exec(
        "node",
        "--test",
        "--test-reporter=tap",
        *(str(tests_dir / f) for f in files),
        cwd=CLIENT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    raw, _ = await asyncio.wait_for(node.communicate(), timeout=120)
    assert node.returncode is not None
    return node.returncode, raw.decode(errors="replace")


def _assert_all_passed(returncode: int, output: str, expected: int, context: str) -> None:
    assert returncode == 0, context
    assert _tap_count(output, "fail") == 0, context
    assert _tap_count(output, "skipped") == 0, context  # every part ran: nothing was missing
    assert _tap_count(output, "pass") == expected, context

"""`bulkhead up` brings services up healthy, the CLI works against them, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import pytest


def _free_port_base() -> int:
    """A base B such that B+51..B+56, B+151..B+156 and B+80 are free (gRPC, metrics and console ports of `up`)."""
    for _ in range(50):
        # 20000..31600 (+180): apart from other runs, below the kernel's ephemeral range (32768+), so no
        # port-0 bind or client socket takes one before `up` binds it, and clear of free_port()'s pool.
        base = random.SystemRandom().randrange(100, 159) * 200
        ports = [base + p for p in (*range(51, 57), *range(151, 157), 80)]
        socks = []
        try:
            for port in ports:
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                socks.append(s)
            return base
        except OSError:
            time.sleep(0.01)
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait_for(proc: subprocess.Popen, pattern: str, timeout: float, lines: list[str]) -> None:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None, "started with stdout=PIPE"
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        if re.search(pattern, line):
            return
    raise AssertionError(f"{pattern!r} not seen; output was:\n{''.join(lines)}")


@pytest.fixture
def up_identity(tmp_path):
    """`bulkhead up --only identity` on free ports; yields (process, port base, output lines, service pid)."""
    base = _free_port_base()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("BULKHEAD_API_KEY", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bulkhead_cli",
            "up",
            "--data-dir",
            str(tmp_path),
            "--only",
            "identity",
            "--port-base",
            str(base),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        _wait_for(proc, r"all services healthy", 60, lines)
        row = re.search(r"^identity\s+127\.0\.0\.1:(\d+)\s+\S+\s+(\d+)\s+healthy", "".join(lines), re.M)
        assert row, "".join(lines)
        assert int(row.group(1)) == base + 51
        yield proc, base, lines, int(row.group(2))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _cli(args: list[str], base: int, data_dir) -> subprocess.CompletedProcess:
    env = {**os.environ, "BULKHEAD_IDENTITY_ADDR": f"127.0.0.1:{base + 51}"}
    env.pop("BULKHEAD_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "bulkhead_cli", *args, "--data-dir", str(data_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
def test_up_serves_cli_and_stops_cleanly(up_identity, tmp_path):
    """up → healthy table → `tenants create` and `tenants list` work → SIGINT → no service process left."""
    proc, base, lines, service_pid = up_identity
    assert _alive(service_pid) and "operator API key: bk_t_platform_" in "".join(lines)
    created = _cli(["tenants", "create", "acme", "--tier", "bridge"], base, tmp_path)
    assert created.returncode == 0, created.stderr
    assert re.search(r"t_[a-z0-9]+\s+acme\s+bridge\s+local\s+active", created.stdout)
    assert re.search(r"bk_t_[a-z0-9]+_k_[a-z0-9]+_[0-9a-f]{48}", created.stdout)
    listed = _cli(["tenants", "list"], base, tmp_path)
    assert "acme" in listed.stdout and "platform" in listed.stdout
    dup = _cli(["tenants", "create", "acme"], base, tmp_path)
    assert dup.returncode == 1 and "ALREADY_EXISTS" in dup.stderr and "Traceback" not in dup.stderr

    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    assert proc.returncode == 0
    deadline = time.monotonic() + 5
    while _alive(service_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(service_pid), "identity survived Ctrl-C"


@pytest.mark.slow
def test_killed_service_is_reported_and_restarted(up_identity, tmp_path):
    """kill -9 of a service under up: up restarts it and says so, and calls succeed again. While nothing
    listens, a call fails UNAVAILABLE with the hint (shown on a port nobody serves: a kill's window is
    shorter than the CLI's start plus the channel's resends of a read)."""
    proc, base, lines, service_pid = up_identity
    os.kill(service_pid, signal.SIGKILL)
    down = _cli(["tenants", "list"], base + 1, tmp_path)
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr and "bulkhead up" in down.stderr
    _wait_for(proc, r"identity is healthy again", 60, lines)
    assert re.search(r"identity exited with code -9; restarting", "".join(lines))
    again = _cli(["tenants", "list"], base, tmp_path)
    assert again.returncode == 0 and "platform" in again.stdout


@pytest.mark.slow
def test_metrics_endpoint_counts_rpcs_by_method_and_tenant(up_identity, tmp_path):
    """Each service serves Prometheus metrics; RPCs are counted by method and (bounded) tenant label."""
    import urllib.request

    _proc, base, _lines, _ = up_identity
    assert _cli(["tenants", "list"], base, tmp_path).returncode == 0
    body = urllib.request.urlopen(f"http://127.0.0.1:{base + 151}/metrics", timeout=5).read().decode()
    assert re.search(
        r'bulkhead_rpc_requests_total\{code="OK",method="/bulkhead.identity.v1.IdentityService/'
        r'ListTenants",service="identity",tenant="t_platform"\} 1.0',
        body,
    ), body[:2000]
    assert "bulkhead_rpc_latency_seconds_bucket" in body


@pytest.mark.slow
def test_second_up_on_the_same_ports_refuses_clearly(up_identity, tmp_path):
    """A second `up` on ports in use says so and exits, instead of reporting another mesh's health as its own."""
    _, base, _, _ = up_identity
    env = {**os.environ}
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "bulkhead_cli",
            "up",
            "--data-dir",
            str(tmp_path / "other"),
            "--only",
            "identity",
            "--port-base",
            str(base),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1
    assert f"already in use: 127.0.0.1:{base + 51}" in second.stdout and "--port-base" in second.stdout


async def test_a_service_failing_to_start_shows_its_last_log_lines_even_when_quiet(tmp_path):
    """With --quiet the services' logs are hidden, so the start error carries the failing one's last lines."""
    from bulkhead_cli.supervisor import Supervisor

    base = _free_port_base()
    env = {
        **os.environ,
        "BULKHEAD_DATA_DIR": str(tmp_path),
        "BULKHEAD_IDENTITY_ADDR": f"127.0.0.1:{base + 51}",
        "BULKHEAD_IDENTITY_METRICS_PORT": "0",
        "BULKHEAD_IDENTITY_DATABASE_URL": "mysql://nowhere/identity",
    }
    shown: list[str] = []
    supervisor = Supervisor(["identity"], env, echo=shown.append, show_logs=False)
    try:
        with pytest.raises(RuntimeError) as failed:
            await supervisor.start(timeout=60)
    finally:
        await supervisor.stop(grace=2)
    message = str(failed.value)
    assert "identity exited with code" in message and "its last log lines" in message
    assert "unsupported database 'mysql'" in message and not shown

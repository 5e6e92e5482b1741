"""`bulkhead up` brings services up healthy, the CLI works against them, and Ctrl-C leaves nothing behind."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest


def _free_port_base() -> int:
    """A base B such that B+51..B+56 and B+151..B+156 are free (gRPC and metrics ports of `up`)."""
    for _ in range(50):
        base = 20000 + (os.getpid() * 7 + int(time.time() * 1000)) % 30000 // 200 * 200
        ports = [base + p for p in (*range(51, 57), *range(151, 157))]
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


@pytest.mark.slow
def test_up_serves_cli_and_stops_cleanly(tmp_path):
    """up → healthy table → `tenants create` and `tenants list` work → SIGINT → no service process left."""
    base = _free_port_base()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("BULKHEAD_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "bulkhead.cli", "up", "--data-dir", str(tmp_path), "--only",
                             "identity", "--port-base", str(base)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        _wait_for(proc, r"all services healthy", 60, lines)
        output = "".join(lines)
        row = re.search(r"^identity\s+127\.0\.0\.1:(\d+)\s+\S+\s+(\d+)\s+healthy", output, re.M)
        assert row, output
        service_pid = int(row.group(2))
        assert int(row.group(1)) == base + 51 and _alive(service_pid)
        assert "operator API key: bk_t_platform_" in output

        cli_env = {**env, "BULKHEAD_IDENTITY_ADDR": f"127.0.0.1:{base + 51}"}
        created = subprocess.run([sys.executable, "-m", "bulkhead.cli", "tenants", "create", "acme", "--tier",
                                  "bridge", "--data-dir", str(tmp_path)], env=cli_env, capture_output=True,
                                 text=True, timeout=60)
        assert created.returncode == 0, created.stderr
        assert re.search(r"t_[a-z0-9]+\s+acme\s+bridge\s+local\s+active", created.stdout)
        assert re.search(r"bk_t_[a-z0-9]+_k_[a-z0-9]+_[0-9a-f]{48}", created.stdout)
        listed = subprocess.run([sys.executable, "-m", "bulkhead.cli", "tenants", "list", "--data-dir", str(tmp_path)],
                                env=cli_env, capture_output=True, text=True, timeout=60)
        assert "acme" in listed.stdout and "platform" in listed.stdout

        dup = subprocess.run([sys.executable, "-m", "bulkhead.cli", "tenants", "create", "acme", "--data-dir",
                              str(tmp_path)], env=cli_env, capture_output=True, text=True, timeout=60)
        assert dup.returncode == 1 and "ALREADY_EXISTS" in dup.stderr and "Traceback" not in dup.stderr

        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        assert proc.returncode == 0
        deadline = time.monotonic() + 5
        while _alive(service_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(service_pid), "identity survived Ctrl-C"
    finally:
        if proc.poll() is None:
            proc.kill()

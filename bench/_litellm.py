"""LiteLLM as a peer for bench/proxy.py: a throwaway virtualenv, a config and a running proxy.

LiteLLM is never a project dependency: it lives in its own virtualenv under the user's cache
(reused when present), and runs in its cheapest set-up: 1 worker, no database, no master key.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping

VERSION = "1.106.12"
"""Pinned: one known release to compare against, and a pin keeps a bad upload out (newer ones want
companion packages that the registry here does not have)."""
MODEL_ALIAS = "claude-bench"
"""The model name the load asks LiteLLM for; the config maps it to anthropic/<pinned model>."""


def venv_dir(env: Mapping[str, str] | None = None) -> pathlib.Path:
    """Where the throwaway virtualenv lives (XDG cache, so `rm -r` of it is always safe)."""
    environ = os.environ if env is None else env
    cache = pathlib.Path(environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    return cache / "bulkhead-bench" / "litellm-venv"


def ensure_venv(version: str = VERSION, *, log=print) -> pathlib.Path:
    """The virtualenv's python with litellm[proxy]==version installed, installing it on first use."""
    where = venv_dir()
    python = where / "bin" / "python"
    marker = where / f"installed-litellm-{version}"
    if marker.exists():
        log(f"litellm {version}: reusing {where}")
        return python
    if not python.exists():
        log(f"litellm {version}: creating a virtualenv in {where}")
        subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    log(f"litellm {version}: pip install 'litellm[proxy]=={version}' (a few minutes the first time)")
    # pip's own progress goes to our stdout line by line, so a long install visibly moves.
    proc = subprocess.Popen(
        [str(python), "-m", "pip", "install", "--progress-bar", "off", f"litellm[proxy]=={version}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout or ():
        if line.startswith(("Collecting", "Installing", "Successfully", "ERROR")):
            log("  " + line.rstrip())
    if proc.wait():
        raise SystemExit(f"pip install litellm[proxy]=={version} failed (exit {proc.returncode})")
    marker.touch()
    return python


def config_yaml(upstream_url: str, model: str, api_key: str, master_key: str) -> str:
    """A config with one deployment: MODEL_ALIAS -> anthropic/<model> at the fake upstream, nothing else on.

    A master key is set because LiteLLM refuses to start without one; with no database it is
    checked against the config alone, its cheapest form of authentication.
    """
    # JSON is YAML: no YAML library needed here, and every value is quoted safely.
    import json

    return json.dumps(
        {
            "model_list": [
                {
                    "model_name": MODEL_ALIAS,
                    "litellm_params": {"model": f"anthropic/{model}", "api_base": upstream_url, "api_key": api_key},
                }
            ],
            "litellm_settings": {"telemetry": False, "num_retries": 0, "request_timeout": 60},
            "general_settings": {"master_key": master_key},
        },
        indent=2,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    python: pathlib.Path, config: pathlib.Path, *, log_to: pathlib.Path, timeout: float = 180.0
) -> tuple[subprocess.Popen, str]:
    """Start the LiteLLM proxy (1 worker) on a loopback port; returns the process and its base URL."""
    port = free_port()
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no network here: skip fetching the price map
        "LITELLM_LOG": "ERROR",
        "DISABLE_SCHEMA_UPDATE": "True",
    }
    env.pop("DATABASE_URL", None)  # no database: its cheapest set-up
    litellm = python.parent / "litellm"
    with open(log_to, "w") as log:
        proc = subprocess.Popen(
            [str(litellm), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "".join(log_to.read_text(errors="replace").splitlines(keepends=True)[-15:])
            raise SystemExit(f"litellm exited ({proc.returncode}) while starting; its log ends:\n{tail}")
        try:
            with urllib.request.urlopen(url + "/health/liveliness", timeout=1) as resp:
                if resp.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"litellm did not answer on {url} within {timeout:.0f} s; see {log_to}")


def stop(proc: subprocess.Popen) -> None:
    """Stop the proxy and any worker it forked (it runs in a session of its own)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def tree_pids(pid: int) -> list[int]:
    """pid and all its descendants (a worker may run in a child of the `litellm` launcher)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in pathlib.Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in task.read_text().split())
    return out

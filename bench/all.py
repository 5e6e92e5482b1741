#!/usr/bin/env python3
"""Run every bench script, write bench/results.json and print one table of figure, target and verdict.

Each script runs in its own process, one after another (they would skew each other otherwise),
with arguments that bound its time, and hands its figures back through `--json FILE`. Its full
output goes to a log file, whose folder is printed at the end. Not part of CI: minutes long.

    python bench/all.py                 # every bench, LiteLLM included (~17 min on 2 cores)
    python bench/all.py --quick         # smoke run: every bench in its --quick mode, no LiteLLM
    python bench/all.py --only proxy,credentials
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._table import collect, machine, render, rows  # noqa: E402

RESULTS = ROOT / "bench" / "results.json"


@dataclasses.dataclass(frozen=True)
class Bench:
    """One bench script and how to keep it bounded."""

    name: str
    """The script's file name without `.py`; also the prefix of its figures."""
    full: tuple[str, ...]
    """Arguments for a real run."""
    quick: tuple[str, ...]
    """Arguments for a smoke run."""
    timeout: float
    """Seconds before a real run is abandoned (a smoke run gets a third)."""
    script: str = ""
    """The bench script when it is not `name` (the same script run with other arguments)."""

    @property
    def file(self) -> str:
        """The script's file name in bench/."""
        return f"{self.script or self.name}.py"


BENCHES = (
    Bench("proxy", ("--seconds", "8", "--replicas"), ("--quick", "--replicas"), 1800),  # + installing LiteLLM once
    # The same proxy on its opt-in upstream transport (its own HTTP pool, not the SDK's): the figures
    # the inference goals reach once the SDK's per-call request building is off the path.
    Bench(
        "proxy_direct", ("--seconds", "8", "--transport", "direct"), ("--quick", "--transport", "direct"), 900, "proxy"
    ),
    Bench("orchestrator", (), ("--quick",), 600),
    # Issue 16 states the 100-concurrent-runs goal on Postgres; the SQLite run above keeps the per-run figures.
    Bench("orchestrator_pg", ("--postgres",), ("--quick", "--postgres"), 600, "orchestrator"),
    Bench("credentials", (), ("--quick",), 600),
    Bench("metering", ("--seconds", "4"), ("--quick",), 600),
    Bench("state", (), ("--quick",), 600),
    Bench("interceptor", ("--seconds", "2", "--rounds", "3"), ("--quick",), 600),
    Bench("identity_rss", ("--mesh",), ("--mesh",), 600),
    Bench("mtls", (), ("--quick",), 600),
    Bench("attempts", ("5000", "64"), ("500", "32"), 300),
    Bench("console", (), ("--quick",), 900),
)


def command(bench: Bench, *, quick: bool, peer: str | None, json_to: pathlib.Path) -> list[str]:
    """The command line that runs `bench`, writing its figures to `json_to`."""
    args = [*(bench.quick if quick else bench.full)]
    if bench.name == "proxy" and peer:
        args += ["--peer", peer]
    return [sys.executable, str(ROOT / "bench" / bench.file), *args, "--json", str(json_to)]


def run_one(bench: Bench, *, quick: bool, peer: str | None, logs: pathlib.Path) -> dict:
    """Run one bench script; its record for results.json (figures empty if it failed)."""
    json_to, log = logs / f"{bench.name}.json", logs / f"{bench.name}.log"
    cmd = command(bench, quick=quick, peer=peer, json_to=json_to)
    # The venv's bin on PATH: benches find its tools (the OpenBao binary) as an activated venv would.
    env = {**os.environ, "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    started = time.perf_counter()
    with open(log, "w") as out:
        try:
            code: int | str = subprocess.run(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
                timeout=bench.timeout / 3 if quick else bench.timeout,
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    figures = json.loads(json_to.read_text()) if json_to.exists() else {}
    return {
        "command": " ".join(cmd[1:]),
        "exit": code,
        "seconds": round(time.perf_counter() - started, 1),
        "figures": figures,
        "log": str(log),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every bench in its smoke mode (a few minutes)")
    parser.add_argument("--only", help="comma-separated bench names, e.g. proxy,credentials")
    parser.add_argument(
        "--peer", choices=("litellm", "none"), help="proxy bench's peer (default: litellm, none with --quick)"
    )
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help=f"default {RESULTS.relative_to(ROOT)}")
    args = parser.parse_args()
    chosen = [b for b in BENCHES if not args.only or b.name in args.only.split(",")]
    if args.only and len(chosen) != len(args.only.split(",")):
        parser.error(f"--only takes names from: {', '.join(b.name for b in BENCHES)}")
    peer = None if (args.peer or ("none" if args.quick else "litellm")) == "none" else "litellm"

    info = machine()
    logs = pathlib.Path(tempfile.mkdtemp(prefix="bench-all-"))
    started = datetime.datetime.now(datetime.UTC)
    print(f"{len(chosen)} benches{' (quick)' if args.quick else ''}, one at a time; logs in {logs}", flush=True)
    records = {}
    for i, bench in enumerate(chosen, 1):
        print(f"[{i}/{len(chosen)}] {bench.name} ...", end=" ", flush=True)
        records[bench.name] = record = run_one(bench, quick=args.quick, peer=peer, logs=logs)
        status = "ok" if record["exit"] == 0 else f"FAILED (exit {record['exit']}; see {record['log']})"
        print(f"{record['seconds']:.0f} s, {len(record['figures'])} figures, {status}", flush=True)

    figures = collect({name: r["figures"] for name, r in records.items()})
    table = rows(figures, [b.name for b in chosen])
    note = "quick: a smoke run, figures not for quoting" if args.quick else ""
    print()
    print(render(table, info, note=note))
    args.out.write_text(
        json.dumps(
            {
                "started": started.isoformat(timespec="seconds"),
                "quick": args.quick,
                "machine": info,
                "benches": records,
                "table": [dataclasses.asdict(r) for r in table],
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {args.out}; each bench's full output: {logs}")
    return 0 if all(r["exit"] == 0 for r in records.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The protos lint clean and the committed stubs are exactly what the protos generate."""

from __future__ import annotations

import difflib
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
GENERATED = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py", "*_pb2_grpc.pyi")

# Lines that record which protoc/grpcio-tools release generated a file, not what the protos say:
# a fresh CI venv may resolve a newer grpcio-tools, and that alone must not count as stale.
_TOOLCHAIN_LINES = [
    (re.compile(r"^# Protobuf Python Version: .*$", re.M), "# Protobuf Python Version: *"),
    (
        re.compile(
            r"^(_runtime_version\.ValidateProtobufRuntimeVersion\(\n"
            r"\s+_runtime_version\.Domain\.PUBLIC,\n)\s+\d+,\n\s+\d+,\n\s+\d+,\n\s+'[^']*',\n",
            re.M,
        ),
        r"\1    *\n",
    ),
    (re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.M), "GRPC_GENERATED_VERSION = '*'"),
]


def _normalised(path: pathlib.Path) -> str:
    text = path.read_text()
    for pattern, replacement in _TOOLCHAIN_LINES:
        text = pattern.sub(replacement, text)
    return text


def _stubs(tree: pathlib.Path) -> dict[str, pathlib.Path]:
    """Generated stub files under tree/bulkhead, keyed by their path relative to tree."""
    found: dict[str, pathlib.Path] = {}
    for pattern in GENERATED:
        for path in (tree / "bulkhead").rglob(pattern):
            if "__pycache__" not in path.parts:
                found[str(path.relative_to(tree))] = path
    return found


def test_committed_stubs_match_the_protos(tmp_path: pathlib.Path) -> None:
    """Regenerating into a temp dir gives the committed stubs: none stale, missing or extra."""
    done = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"gen_protos.py failed:\n{done.stdout}{done.stderr}"
    fresh, committed = _stubs(tmp_path), _stubs(ROOT)
    assert fresh, "gen_protos.py generated no stubs"
    problems: list[str] = []
    problems += [f"missing (run gen_protos.py): {p}" for p in sorted(fresh.keys() - committed.keys())]
    problems += [f"extra, no proto makes it (delete it): {p}" for p in sorted(committed.keys() - fresh.keys())]
    for rel in sorted(fresh.keys() & committed.keys()):
        want, have = _normalised(fresh[rel]), _normalised(committed[rel])
        if want != have:
            diff = "".join(
                list(
                    difflib.unified_diff(
                        have.splitlines(True), want.splitlines(True), f"committed/{rel}", f"fresh/{rel}"
                    )
                )[:20]
            )
            problems.append(f"stale: {rel}\n{diff}")
    assert not problems, "stubs differ from protos; run `python scripts/gen_protos.py`:\n" + "\n".join(problems)


def test_buf_lint_is_clean() -> None:
    """`buf lint` (STANDARD, from buf.yaml) reports nothing."""
    buf = shutil.which("buf")
    if buf is None:
        pytest.fail("the `buf` binary is not on PATH: pip install buf-bin (part of '.[test]')", pytrace=False)
    done = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and not done.stdout.strip(), (
        f"buf lint failed (exit {done.returncode}):\n{done.stdout}{done.stderr}"
    )

"""`.ci/buf-breaking`: buf breaking against an earlier commit's protos, in a throwaway git repo."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / ".ci" / "buf-breaking"

pytestmark = pytest.mark.skipif(
    shutil.which("buf") is None or shutil.which("git") is None, reason="needs buf and git on PATH"
)

PROTO_V1 = """syntax = "proto3";
package demo.v1;
// Widget is a thing.
message Widget {
  // Its name.
  string name = 1;
  // Its size.
  int64 size = 2;
}
"""


def _git(repo: pathlib.Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=repo, check=True, capture_output=True
    )


def _commit(repo: pathlib.Path, proto: str, message: str) -> None:
    (repo / "protos" / "demo" / "v1" / "demo.proto").write_text(proto)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", message)


def _run(repo: pathlib.Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT)],
        cwd=repo,
        check=False,
        text=True,
        capture_output=True,
        env={**os.environ, **env},
        timeout=60,
    )


@pytest.fixture
def repo(tmp_path: pathlib.Path) -> pathlib.Path:
    """An empty git repo on branch main with the project's buf.yaml."""
    (tmp_path / "protos" / "demo" / "v1").mkdir(parents=True)
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    _git(tmp_path, "init", "-q", "-b", "main")
    return tmp_path


def test_first_commit_has_nothing_to_compare(repo: pathlib.Path) -> None:
    """On the very first commit the check passes and says why."""
    _commit(repo, PROTO_V1, "first")
    result = _run(repo)
    assert result.returncode == 0, result.stderr
    assert "nothing to compare" in result.stdout


def test_removed_field_on_main_fails(repo: pathlib.Path) -> None:
    """Deleting a field, committed on main, fails against the previous commit."""
    _commit(repo, PROTO_V1, "first")
    _commit(repo, PROTO_V1.replace("  // Its size.\n  int64 size = 2;\n", ""), "drop size")
    result = _run(repo)
    assert result.returncode != 0
    assert "size" in result.stdout + result.stderr


def test_feature_branch_is_compared_with_main(repo: pathlib.Path) -> None:
    """On a branch, a changed field type is caught against main; an added field is fine."""
    _commit(repo, PROTO_V1, "first")
    _git(repo, "checkout", "-q", "-b", "feature")
    _commit(repo, PROTO_V1.replace("}\n", "  // Its colour.\n  string colour = 3;\n}\n"), "add colour")
    assert _run(repo).returncode == 0
    _commit(repo, PROTO_V1.replace("int64 size", "string size"), "retype size")
    result = _run(repo)
    assert result.returncode != 0
    assert "against main" in result.stdout


def test_missing_ref_is_not_a_failure(repo: pathlib.Path) -> None:
    """An explicit ref that does not exist is reported and skipped."""
    _commit(repo, PROTO_V1, "first")
    result = _run(repo, BUF_BREAKING_AGAINST="release-9")
    assert result.returncode == 0 and "does not exist" in result.stdout


def test_this_repository_has_no_breaking_proto_change() -> None:
    """The CI gate itself: protos/ here against main (or, on main, the previous commit)."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    result = _run(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("buf-breaking:")

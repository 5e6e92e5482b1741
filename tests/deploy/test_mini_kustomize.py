"""The fallback renderer (mini_kustomize) renders deploy/ exactly as `kubectl kustomize` does."""

from __future__ import annotations

import base64

import pytest

from tests.deploy import mini_kustomize
from tests.deploy.k8s_helpers import DEPLOY, K8S, OVERLAYS, kustomize_command, render_with_tool

DIRS = {
    **{name: K8S / "overlays" / name for name in OVERLAYS},
    "base": K8S / "base",
    "postgres": DEPLOY / "postgres",
    "openbao-dev": DEPLOY / "openbao" / "dev",
    "openbao-raft": DEPLOY / "openbao" / "raft",
}


def _keyed(objs: list[dict]) -> dict[tuple[str, str, str], dict]:
    for obj in objs:  # kustomize wraps base64 at 76 columns; compare the values themselves
        if obj["kind"] == "Secret":
            obj["data"] = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    return {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o for o in objs}


@pytest.mark.skipif(kustomize_command() is None, reason="needs kubectl or kustomize to compare against")
@pytest.mark.parametrize("name", sorted(DIRS))
def test_fallback_renderer_matches_kustomize(name: str) -> None:
    """Same objects, same content, for every kustomization in deploy/."""
    ours, theirs = _keyed(mini_kustomize.build(DIRS[name])), _keyed(render_with_tool(DIRS[name]))
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key] == theirs[key], key


def test_fallback_renderer_refuses_what_it_does_not_know(tmp_path) -> None:
    """A kustomize feature outside the supported subset is an error, never silently dropped."""
    (tmp_path / "kustomization.yaml").write_text("namePrefix: x-\nresources: []\n")
    with pytest.raises(mini_kustomize.Unsupported):
        mini_kustomize.build(tmp_path)

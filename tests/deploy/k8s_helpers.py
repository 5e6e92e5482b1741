"""Offline helpers for the deployment tests: render kustomizations, read objects, evaluate policies.

Nothing here talks to a cluster: overlays are rendered with `kubectl kustomize` (or `kustomize
build`), NetworkPolicies are evaluated by the rules of the Kubernetes API, and container
environments are rebuilt the way the kubelet would (envFrom, then env, secrets resolved from
the rendered Secrets when the overlay generates them).
"""

from __future__ import annotations

import base64
import functools
import pathlib
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("dev", "prod", "silo-tenant")
KUBERNETES_VERSION = "1.30.0"
"""The oldest Kubernetes the manifests promise to work on (native gRPC probes are GA since 1.27)."""

Obj = dict[str, Any]


def kustomize_command() -> list[str] | None:
    """The renderer available offline on this machine, if any."""
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


@functools.cache
def _tool_output(path: pathlib.Path) -> str:
    command = kustomize_command()
    assert command is not None, "no kustomize renderer"
    return subprocess.run([*command, str(path)], check=True, capture_output=True, text=True, timeout=60).stdout


def render_with_tool(path: pathlib.Path) -> list[Obj]:
    """The objects `kubectl kustomize` (or `kustomize build`) renders from a directory
    (rendered once per test session; each call gets its own copy to change)."""
    return [d for d in yaml.safe_load_all(_tool_output(path)) if d]


def render(path: pathlib.Path) -> list[Obj]:
    """The objects a kustomization directory renders to: the real tool when installed, else
    mini_kustomize (checked against the real tool wherever both exist)."""
    if kustomize_command() is not None:
        return render_with_tool(path)
    from tests.deploy import mini_kustomize

    return mini_kustomize.build(path)


def load_yaml_files(root: pathlib.Path) -> Iterator[tuple[pathlib.Path, Obj]]:
    """Every YAML document under root, with the file it came from."""
    for path in sorted(root.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def find(objs: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    """Objects of one kind (and name)."""
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    """The single object of that kind and name."""
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def namespace_of(objs: list[Obj]) -> str:
    """The namespace the overlay puts everything in."""
    (ns,) = find(objs, "Namespace")
    return ns["metadata"]["name"]


# -- selectors and network policies ----------------------------------------------------------


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector against a label set (an empty selector matches everything)."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or ():
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


@dataclass(frozen=True)
class Pod:
    """A pod as NetworkPolicies see it: its labels and its namespace's labels."""

    namespace: str
    labels: Mapping[str, str]
    namespace_labels: Mapping[str, str]


def _peer_admits(peer: Mapping[str, Any], policy_ns: str, src: Pod) -> bool:
    if "ipBlock" in peer:
        return False  # we never use ipBlock; pods are not matched by it here
    has_pod, has_ns = "podSelector" in peer, "namespaceSelector" in peer
    if has_ns:
        if not selector_matches(peer["namespaceSelector"], src.namespace_labels):
            return False
    elif src.namespace != policy_ns:
        return False  # a bare podSelector selects pods of the policy's own namespace only
    return not has_pod or selector_matches(peer["podSelector"], src.labels)


def _port_admits(ports: list[Mapping[str, Any]] | None, port: int) -> bool:
    return not ports or any(p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports)


def ingress_allowed(policies: list[Obj], dst: Pod, src: Pod, port: int) -> bool:
    """Whether the NetworkPolicies let src open a TCP connection to dst:port."""
    selecting = [
        p
        for p in policies
        if p["metadata"].get("namespace", dst.namespace) == dst.namespace
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and selector_matches(p["spec"].get("podSelector"), dst.labels)
    ]
    if not selecting:
        return True
    for policy in selecting:
        policy_ns = policy["metadata"].get("namespace", dst.namespace)
        for rule in policy["spec"].get("ingress") or ():
            peers = rule.get("from")
            if not _port_admits(rule.get("ports"), port):
                continue
            if not peers or any(_peer_admits(peer, policy_ns, src) for peer in peers):
                return True
    return False


def pod_of(objs: list[Obj], workload_kind: str, name: str) -> Pod:
    """The pod a Deployment/StatefulSet of this overlay runs."""
    workload = one(objs, workload_kind, name)
    ns = namespace_of(objs)
    ns_labels = one(objs, "Namespace", ns)["metadata"].get("labels", {})
    return Pod(ns, workload["spec"]["template"]["metadata"]["labels"], ns_labels)


# -- container environments ---------------------------------------------------------------


def secret_value(objs: list[Obj], name: str, key: str) -> str | None:
    """A rendered Secret's value, or None when the overlay does not create that Secret."""
    found = find(objs, "Secret", name)
    if not found:
        return None
    secret = found[0]
    if key in (secret.get("stringData") or {}):
        return secret["stringData"][key]
    data = secret.get("data") or {}
    return base64.b64decode(data[key]).decode() if key in data else None


def container_env(objs: list[Obj], container: Obj) -> tuple[dict[str, str], set[str], set[str]]:
    """(environment, names set from ConfigMaps, names set by the container itself).

    Secrets the overlay does not create resolve to a placeholder that names them.
    """
    env: dict[str, str] = {}
    from_maps: set[str] = set()
    for source in container.get("envFrom") or ():
        cm = one(objs, "ConfigMap", source["configMapRef"]["name"])
        env.update(cm.get("data") or {})
        from_maps |= set(cm.get("data") or {})
    own: set[str] = set()
    for item in container.get("env") or ():
        own.add(item["name"])
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = item["valueFrom"].get("secretKeyRef")
        assert ref is not None, f"{item['name']}: only value and secretKeyRef are used"
        value = secret_value(objs, ref["name"], ref["key"])
        env[item["name"]] = value if value is not None else f"<secret {ref['name']}/{ref['key']}>"
    return env, from_maps, own


class RecordingEnv(Mapping[str, str]):
    """A read-only environment that remembers which names the code looked up."""

    def __init__(self, data: Mapping[str, str]):
        self._data = dict(data)
        self._copying: set[str] = set()
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        # dict(env) asks for keys() and then fetches each one: a copy, not a lookup.
        if key in self._copying:
            self._copying.discard(key)
        else:
            self.read.add(key)
        return self._data[key]

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.read.add(key)
        return self._data.get(key, default)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.read.add(key)
        return key in self._data

    def keys(self):  # type: ignore[override]
        self._copying = set(self._data)
        return list(self._data)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._data)

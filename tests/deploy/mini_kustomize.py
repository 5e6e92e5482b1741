"""A small kustomize for the subset deploy/ uses, so the manifest tests also run where neither
`kubectl` nor `kustomize` is installed. test_mini_kustomize.py checks it against `kubectl
kustomize` wherever that exists.

Supported: resources (files, directories), components, namespace, labels (pairs,
includeTemplates), replicas, images, configMapGenerator (files), secretGenerator (literals),
generatorOptions.disableNameSuffixHash, and patches (inline or file; JSON 6902 with a target
of kind/name/labelSelector, or strategic merge incl. `$patch: delete`). Anything else is an
error, so a new kustomize feature in deploy/ cannot be silently ignored here.
"""

from __future__ import annotations

import base64
import copy
import json
import pathlib
from typing import Any

import yaml

Obj = dict[str, Any]
_KNOWN = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "namespace",
    "labels",
    "replicas",
    "images",
    "configMapGenerator",
    "secretGenerator",
    "generatorOptions",
    "patches",
}
_CLUSTER_SCOPED = {"Namespace"}
_WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


class Unsupported(ValueError):
    """deploy/ uses a kustomize feature this renderer does not implement."""


def build(path: pathlib.Path) -> list[Obj]:
    """Render the kustomization in directory `path`."""
    spec = yaml.safe_load((path / "kustomization.yaml").read_text())
    return _apply(spec, path, _resources(spec, path))


def _resources(spec: Obj, root: pathlib.Path) -> list[Obj]:
    objs: list[Obj] = []
    for entry in spec.get("resources", ()):
        target = (root / entry).resolve()
        if target.is_dir():
            objs += build(target)
        else:
            # Through JSON: a YAML alias would otherwise be one dict in two places.
            objs += [json.loads(json.dumps(d)) for d in yaml.safe_load_all(target.read_text()) if d]
    return objs


def _apply(spec: Obj, root: pathlib.Path, objs: list[Obj]) -> list[Obj]:
    unknown = set(spec) - _KNOWN
    if unknown:
        raise Unsupported(f"{root}: {sorted(unknown)}")
    objs = objs + _generated(spec, root)
    for entry in spec.get("components", ()):
        component_root = (root / entry).resolve()
        component = yaml.safe_load((component_root / "kustomization.yaml").read_text())
        objs = _apply(component, component_root, objs + _resources(component, component_root))
    for patch in spec.get("patches", ()):
        objs = _patch(objs, patch, root)
    if "namespace" in spec:
        for obj in objs:
            if obj["kind"] not in _CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
    for label in spec.get("labels", ()):
        if label.get("includeSelectors"):
            raise Unsupported("labels.includeSelectors")
        for obj in objs:
            obj["metadata"].setdefault("labels", {}).update(label["pairs"])
            if label.get("includeTemplates") and obj["kind"] in _WORKLOADS:
                obj["spec"]["template"]["metadata"].setdefault("labels", {}).update(label["pairs"])
    for replica in spec.get("replicas", ()):
        for obj in objs:
            if obj["kind"] in _WORKLOADS and obj["metadata"]["name"] == replica["name"]:
                obj["spec"]["replicas"] = replica["count"]
    for image in spec.get("images", ()):
        for obj in objs:
            if obj["kind"] in _WORKLOADS:
                for container in obj["spec"]["template"]["spec"]["containers"]:
                    name, _, tag = container["image"].partition(":")
                    if name == image["name"]:
                        name = image.get("newName", name)
                        tag = str(image.get("newTag", tag))
                        container["image"] = f"{name}:{tag}" if tag else name
    return objs


def _generated(spec: Obj, root: pathlib.Path) -> list[Obj]:
    generates = spec.get("configMapGenerator") or spec.get("secretGenerator")
    if generates and not (spec.get("generatorOptions") or {}).get("disableNameSuffixHash"):
        raise Unsupported("generators need generatorOptions.disableNameSuffixHash here")
    out: list[Obj] = []
    for gen in spec.get("configMapGenerator", ()):
        data = {}
        for item in gen.get("files", ()):
            key, _, file = item.rpartition("=") if "=" in item else ("", "", item)
            data[key or pathlib.Path(file).name] = (root / file).read_text()
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    for gen in spec.get("secretGenerator", ()):
        if set(gen) - {"name", "literals"}:
            raise Unsupported(f"secretGenerator {sorted(gen)}")
        data = {}
        for literal in gen.get("literals", ()):
            key, _, value = literal.partition("=")
            data[key] = base64.b64encode(value.encode()).decode()
        out.append(
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": gen["name"]}, "type": "Opaque", "data": data}
        )
    return out


# -- patches ----------------------------------------------------------------------------------


def _selected(obj: Obj, target: Obj) -> bool:
    if "kind" in target and obj["kind"] != target["kind"]:
        return False
    if "name" in target and obj["metadata"]["name"] != target["name"]:
        return False
    for term in (target.get("labelSelector") or "").split(","):
        if term:
            key, _, value = term.partition("=")
            if (obj["metadata"].get("labels") or {}).get(key) != value:
                return False
    return True


def _patch(objs: list[Obj], patch: Obj, root: pathlib.Path) -> list[Obj]:
    text = patch["patch"] if "patch" in patch else (root / patch["path"]).read_text()
    doc = yaml.safe_load(text)
    if isinstance(doc, list):  # JSON 6902
        for obj in objs:
            if _selected(obj, patch["target"]):
                for op in doc:
                    _json_op(obj, op)
        return objs
    target = patch.get("target") or {"kind": doc["kind"], "name": doc["metadata"]["name"]}
    if doc.get("$patch") == "delete":
        return [o for o in objs if not _selected(o, target)]
    for obj in objs:
        if _selected(obj, target):
            _merge(obj, {k: v for k, v in doc.items() if k not in ("apiVersion", "kind")})
    return objs


def _json_op(obj: Obj, op: Obj) -> None:
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
    node: Any = obj
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if op["op"] == "add":
        if isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), copy.deepcopy(op["value"]))
        else:
            node[last] = copy.deepcopy(op["value"])
    elif op["op"] == "replace":
        key = int(last) if isinstance(node, list) else last
        if not isinstance(node, list) and key not in node:
            raise KeyError(f"replace of missing {op['path']}")
        node[key] = copy.deepcopy(op["value"])
    elif op["op"] == "remove":
        del node[int(last) if isinstance(node, list) else last]
    else:
        raise Unsupported(f"JSON patch op {op['op']}")


def _merge(base: Obj, patch: Obj) -> None:
    """Strategic merge for what deploy/ patches: maps recursively, lists keyed by `name` merged
    item by item (the patch's items first, in its order, then the rest, as kustomize orders them)."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        elif (
            isinstance(value, list)
            and isinstance(base.get(key), list)
            and all(isinstance(i, dict) and "name" in i for i in value + base[key])
        ):
            by_name = {item["name"]: item for item in base[key]}
            merged = []
            for item in value:
                if item["name"] in by_name:
                    _merge(by_name[item["name"]], item)
                    merged.append(by_name[item["name"]])
                else:
                    merged.append(copy.deepcopy(item))
            patched = {item["name"] for item in value}
            base[key] = merged + [item for item in base[key] if item["name"] not in patched]
        else:
            base[key] = copy.deepcopy(value)

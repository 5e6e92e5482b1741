"""Every in-process cache in services/ and shared/, found in the source (nothing hand-listed).

A cache here is state kept across requests: an instance or module attribute holding a dict, an
OrderedDict, a set or a *Cache object, or a function under functools.cache / lru_cache. Locks,
tasks, futures and queues are left out: they coordinate, they never answer a caller with data;
so are UPPER_CASE module constants.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_CONTAINERS = ("dict[", "OrderedDict", "set[", "Cache")
_COORDINATION = ("Lock", "Task", "Future", "Queue", "Event", "Semaphore", "Connection")


def _is_cache_annotation(text: str) -> bool:
    return any(c in text for c in _CONTAINERS) and not any(c in text for c in _COORDINATION)


def _is_cache_value(node: ast.expr) -> bool:
    if isinstance(node, (ast.Dict, ast.Set)):
        return True
    if isinstance(node, ast.IfExp):
        return _is_cache_value(node.body) or _is_cache_value(node.orelse)
    if isinstance(node, ast.Call):
        name = ast.unparse(node.func)
        return name.endswith("Cache") or name.endswith("OrderedDict") or name in ("set", "dict")
    return False


def _target(node: ast.expr) -> str | None:
    """self._x -> "_x"; a module-level _x -> "_x"; anything else None."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return None


def _caching_decorator(node: ast.expr) -> bool:
    text = ast.unparse(node)
    return text.split("(")[0].rsplit(".", 1)[-1] in ("cache", "lru_cache", "cached_property")


def _sources(root: Path) -> list[str]:
    """The .py files under services/ and shared/: the committed ones in a git checkout (so a colleague's
    unfinished file does not fail this run; CI sees it once committed), else all of them."""
    if (root / ".git").exists():
        out = subprocess.run(
            ["git", "-C", str(root), "ls-files", "--", "services/*.py", "shared/*.py"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return sorted(out.split())
    return sorted(p.relative_to(root).as_posix() for top in ("services", "shared") for p in (root / top).rglob("*.py"))


def find_caches(root: Path = ROOT) -> set[str]:
    """ "path::name" of every cache in services/ and shared/ (tests, test kits and migrations excluded)."""
    found: set[str] = set()
    for rel in _sources(root):
        if "/testing/" not in rel and "/migrations/" not in rel and (root / rel).exists():
            found |= {f"{rel}::{name}" for name in _caches_in(ast.parse((root / rel).read_text(), rel))}
    return found


def _caches_in(tree: ast.Module) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and _target(node.target):
            in_class_body = isinstance(node.target, ast.Name) and node.col_offset > 0
            constant = isinstance(node.target, ast.Name) and node.target.id.isupper()
            if not in_class_body and not constant and _is_cache_annotation(ast.unparse(node.annotation)):
                found.add(_target(node.target))
        elif isinstance(node, ast.Assign) and _is_cache_value(node.value):
            for t in node.targets:
                name = _target(t)
                if name and (isinstance(t, ast.Attribute) or (node.col_offset == 0 and not name.isupper())):
                    found.add(name)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
            _caching_decorator(d) for d in node.decorator_list
        ):
            found.add(f"{node.name}()")
    return found

"""Import the anthropic SDK without the parts the proxy never touches.

The SDK's package __init__ files import every module they name: `import anthropic` loads about 3,500
modules (every beta and admin type and resource, the Bedrock, Vertex and Foundry clients), about 60 MB
of a proxy that uses the Messages API. Here a package whose __init__ only binds names runs as a lazy
package instead: each name is imported from its submodule on first access (PEP 562 __getattr__), so a
name resolves to the very object the eager import binds, and a submodule nobody asks for is never
loaded. The proxy then loads about 1,100 of the SDK's modules, and its peak RSS under load in
bench/proxy.py is about 40 MB lower. (importlib.util.LazyLoader would not do: it defers a whole module
until any attribute is read, and `from .x import y` reads one at once.)

What a lazy __init__ may hold, read from its syntax tree without running it: relative imports (star
imports included: the names they would bind are read from their target the same way), absolute
imports and plain statements (run, with the lazy names they mention resolved first), `if
TYPE_CHECKING` blocks and the SDK's loop that re-homes `__all__` names (`__module__`), done as each
name resolves. Anything else, or any failure while setting one up, runs that __init__ as usual: the
fallback is the eager SDK, never a missing name.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = "anthropic"

_install_lock = threading.Lock()


def anthropic_sdk() -> ModuleType:
    """The anthropic package, imported lazily if nothing in this process imported it yet."""
    if ROOT not in sys.modules:
        install()
    import anthropic

    return anthropic


def install(root: str = ROOT) -> None:
    """Put a lazy-package finder for root's packages first on sys.meta_path (once)."""
    with _install_lock:
        if not any(isinstance(finder, LazyPackageFinder) and finder.root == root for finder in sys.meta_path):
            sys.meta_path.insert(0, LazyPackageFinder(root))


class Unplannable(Exception):
    """An __init__ holds a statement a lazy package cannot stand in for."""


@dataclass
class Plan:
    """What a package __init__ binds, and how, read from its syntax tree."""

    names: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    """name -> (relative module, attribute in it, or None for the module itself)."""
    run: list[ast.stmt] = field(default_factory=list)
    """Statements run in order at import (absolute imports, __all__, calls)."""
    rehome_all: bool = False
    """The SDK's `for name in __all__: ...__module__ = ...` loop: done per name as it resolves."""


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _bound_names(tree: ast.Module) -> list[str]:
    """Public names a module's top level binds (what `from module import *` takes without __all__)."""
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom | ast.Import):
            if any(alias.name == "*" for alias in node.names):
                raise Unplannable("a star import inside a star import's target")
            names += [(alias.asname or alias.name).partition(".")[0] for alias in node.names]
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            if not all(isinstance(target, ast.Name) for target in node.targets):
                raise Unplannable("a star import's target unpacks into names")
            names += [target.id for target in node.targets if isinstance(target, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            names.append(node.target.id)
        elif not isinstance(node, ast.Expr | ast.AnnAssign):
            raise Unplannable(f"a star import's target binds names in a {type(node).__name__} statement")
    explicit = _literal_all(tree)
    return explicit if explicit is not None else [name for name in names if not name.startswith("_")]


def _literal_all(tree: ast.Module) -> list[str] | None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            try:
                return list(ast.literal_eval(node.value))
            except ValueError:
                raise Unplannable("__all__ is not a literal") from None
    return None


def _star_names(directory: Path, relative: str) -> list[str]:
    """The names `from <relative> import *` binds in the package at directory, read without importing the
    target (finding it through the import system would import the package being planned)."""
    base = directory.joinpath(*relative.lstrip(".").split("."))
    for origin in (base / "__init__.py", base.with_suffix(".py")):
        if origin.is_file():
            return _bound_names(ast.parse(origin.read_text(encoding="utf-8")))
    raise Unplannable(f"cannot read the target of a star import {relative}")


def plan(origin: Path) -> Plan:
    """How the package __init__ at origin runs lazily; Unplannable if it cannot."""
    result = Plan()

    def take(node: ast.stmt) -> None:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            module = "." + (node.module or "")
            for alias in node.names:
                if alias.name == "*":
                    for name in _star_names(origin.parent, module):
                        result.names[name] = (module, name)
                elif node.module:
                    result.names[alias.asname or alias.name] = (module, alias.name)
                else:
                    result.names[alias.asname or alias.name] = ("." + alias.name, None)
        elif isinstance(node, ast.ImportFrom) and node.level > 1:
            raise Unplannable("an import from outside the package")
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for inner in node.orelse:
                take(inner)
        elif (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.UnaryOp)
            and isinstance(node.test.op, ast.Not)
            and _is_type_checking(node.test.operand)
        ):
            for inner in node.body:
                take(inner)
        elif (
            isinstance(node, ast.For)
            and isinstance(node.iter, ast.Name)
            and node.iter.id == "__all__"
            and any(isinstance(n, ast.Attribute) and n.attr == "__module__" for n in ast.walk(node))
        ):
            result.rehome_all = True
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            return  # a docstring
        elif isinstance(node, ast.Import | ast.ImportFrom | ast.Assign | ast.AnnAssign | ast.Expr):
            result.run.append(node)
        else:
            raise Unplannable(f"a {type(node).__name__} statement at line {node.lineno}")

    for node in ast.parse(origin.read_text(encoding="utf-8")).body:
        take(node)
    bound = {name for statement in result.run for name in _binds(statement)}
    if bound & result.names.keys():  # which binding of such a name is the last would depend on when each ran
        raise Unplannable(f"{sorted(bound & result.names.keys())} bound both lazily and by a statement")
    return result


def _binds(statement: ast.stmt) -> list[str]:
    """Names a statement run at import binds."""
    if isinstance(statement, ast.Import | ast.ImportFrom):
        return [(alias.asname or alias.name).partition(".")[0] for alias in statement.names]
    return [node.id for node in ast.walk(statement) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)]


class LazyPackageLoader(importlib.abc.Loader):
    """Runs a package __init__ as its Plan; the package's own loader if anything goes wrong."""

    def __init__(self, inner: importlib.abc.Loader, plan: Plan):
        self.inner = inner
        self.plan = plan

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        try:
            _make_lazy(module, self.plan)
        except Exception:  # noqa: BLE001  # whatever went wrong, the package's own __init__ decides
            for name in list(vars(module)):
                if not name.startswith("__") or name in ("__getattr__", "__dir__", "__all__"):
                    delattr(module, name)
            self.inner.exec_module(module)


def _make_lazy(module: ModuleType, plan: Plan) -> None:
    package = module.__name__
    names = plan.names
    rehome: set[str] = set()

    def resolve(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            relative, attribute = names[name]
        except KeyError:
            if importlib.util.find_spec(f"{package}.{name}") is None:
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
            return importlib.import_module(f"{package}.{name}")  # binds itself on the package
        source = importlib.import_module(relative, package)
        if attribute is None:
            value = source
        elif hasattr(source, attribute):
            value = getattr(source, attribute)
        else:  # `from .x import y` with y a submodule of x, as the import system reads it
            value = importlib.import_module(f"{source.__name__}.{attribute}")
        if name in rehome:
            _rehome(value, package)
        setattr(module, name, value)
        return value

    module.__getattr__ = resolve  # type: ignore[method-assign]
    module.__dir__ = lambda: sorted(set(vars(module)) | set(names))  # type: ignore[method-assign]
    namespace = vars(module)
    for statement in plan.run:
        for node in ast.walk(statement):
            if isinstance(node, ast.Name) and node.id in names and node.id not in namespace:
                resolve(node.id)
        code = compile(ast.Module(body=[statement], type_ignores=[]), module.__file__ or package, "exec")
        exec(code, namespace)
    if plan.rehome_all:
        rehome.update(name for name in namespace.get("__all__", ()) if not name.startswith("__"))
        for name in rehome & set(namespace):
            _rehome(namespace[name], package)


def _rehome(value: Any, package: str) -> None:
    with contextlib.suppress(TypeError, AttributeError):  # builtins and constants keep theirs, as in the SDK's loop
        value.__module__ = package


class LazyPackageFinder(importlib.abc.MetaPathFinder):
    """Finds root's packages as usual and hands the plannable ones a LazyPackageLoader."""

    def __init__(self, root: str):
        self.root = root

    def find_spec(
        self, fullname: str, path: Any, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.root and not fullname.startswith(self.root + "."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.submodule_search_locations is None or not spec.origin or spec.loader is None:
            return spec
        try:
            package_plan = plan(Path(spec.origin))
        except (Unplannable, OSError, SyntaxError):
            return spec
        spec.loader = LazyPackageLoader(spec.loader, package_plan)
        return spec

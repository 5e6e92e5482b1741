"""Package boundaries, read from every import statement of the hand-written code.

- `shared/` (the tenancy library) and `bulkhead/` (generated stubs + the typed client) never import
  a service, the CLI (`bulkhead_cli`), the console or the test kit.
- A service never imports another service (peers are called over gRPC), the CLI or the console.
- Nothing the wheel ships imports the test kit (`testkit/`, not packaged) or `tests/`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("shared", "bulkhead", "bulkhead_cli", "services", "console")
NEVER_FROM_LIBRARY = ("services", "bulkhead_cli", "console", "testkit", "tests")


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file; relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return found


def hand_written(top: str) -> list[Path]:
    """The package's .py files, generated stubs left out."""
    return [
        p
        for p in sorted((ROOT / top).rglob("*.py"))
        if not p.name.endswith(("_pb2.py", "_pb2_grpc.py")) and "node_modules" not in p.parts
    ]


def forbidden(importer: Path, module: str) -> str | None:
    """Why importer may not import module, or None."""
    top = importer.relative_to(ROOT).parts[0]
    root = module.split(".")[0]
    if root in ("testkit", "tests"):
        return "shipped code never imports the test kit or the tests"
    if top in ("shared", "bulkhead") and root in NEVER_FROM_LIBRARY:
        return f"{top}/ is a library: it never imports a service, the CLI or the console"
    if top == "services":
        own = importer.relative_to(ROOT).parts[1]
        parts = module.split(".")
        if root == "services" and len(parts) > 1 and parts[1] != own:
            return f"services/{own} calls services/{parts[1]} over gRPC, never by import"
        if root in ("bulkhead_cli", "console"):
            return "a service never imports the CLI or the console"
    if top == "console" and root == "services":
        return "the console talks to the services over gRPC"
    return None


def violations() -> list[str]:
    found = []
    for top in SHIPPED:
        for path in hand_written(top):
            for line, module in imports_of(path):
                why = forbidden(path, module)
                if why:
                    found.append(f"{path.relative_to(ROOT)}:{line} imports {module}: {why}")
    return found


def test_no_import_crosses_a_package_boundary():
    assert violations() == []


@pytest.mark.parametrize(
    "importer, module",
    [
        ("shared/tokens.py", "services.identity.signing"),
        ("shared/db/router.py", "bulkhead_cli.up"),
        ("bulkhead/client/_client.py", "testkit.postgres"),
        ("services/state/server.py", "services.credentials.backend"),
        ("services/metering/servicer.py", "console._app"),
        ("console/_app.py", "services.metering.store"),
    ],
)
def test_each_rule_catches_its_breach(importer, module):
    assert forbidden(ROOT / importer, module) is not None


@pytest.mark.parametrize(
    "importer, module",
    [
        ("services/state/server.py", "services.state.store"),
        ("services/state/server.py", "shared.tokens"),
        ("bulkhead_cli/up.py", "services.identity.server"),
        ("shared/keys.py", "bulkhead.client"),
    ],
)
def test_allowed_imports_pass(importer, module):
    assert forbidden(ROOT / importer, module) is None


def test_the_wheel_ships_the_cli_but_not_the_test_kit():
    import tomllib

    from setuptools import find_packages

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = set(find_packages(where=str(ROOT), include=include))
    assert {"bulkhead", "bulkhead.client", "bulkhead_cli", "shared", "services.state"} <= shipped
    assert not any(p.split(".")[0] in ("testkit", "tests") for p in shipped), sorted(shipped)

"""Every error reason a service can send comes from the catalog (bulkhead.common.v1.ErrorReason).

Statically: an AST scan of services/, shared/ and console/ finds every construction of an error class
(shared.errors' and their subclasses) and every `reason=` string, and resolves each reason (a literal,
`Reason.X`, a module constant, or a parameter of a helper whose callers are then checked the same way).
A reason outside the catalog, or one the scan cannot resolve, fails naming file:line. At run time,
shared.errors refuses to build an error with an unknown reason, and the isolation matrix and fuzz
(tests/isolation/matrix.invoke) check every reason they receive.
"""

from __future__ import annotations

import ast
import pathlib
import re
import sys
from dataclasses import dataclass

import pytest

from bulkhead.common.v1 import errors_pb2
from shared import errors

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCANNED = ("services", "shared", "console")
_BASES = {
    "BulkheadError",
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "Unauthenticated",
    "PermissionDenied",
    "FailedPrecondition",
    "Aborted",
    "Unavailable",
    "DeadlineExceeded",
    "ResourceExhausted",
}
_UPPER = re.compile(r"^[A-Z][A-Z0-9_]*$")

PASS_THROUGH: dict[tuple[str, str], str] = {
    (
        "shared/errors.py",
        "to_error",
    ): "a peer's reason, kept only when the catalog has it (errors.catalog_reason), else the class default",
    (
        "services/inference/proxy.py",
        "*",
    ): "PolicyViolation.reason, itself built from literals this scan checks (services/inference/policy.py)",
}
"""(file, function) -> why a reason there is not a literal: sites that forward a reason checked elsewhere."""

NOT_ERRORS = {"KeptData", "denied", "record", "LeaseGone", "_fail", "finish"}
"""Calls whose `reason=` is not an ErrorInfo reason (a kept table's why, a run's failure reason, an audit
row's outcome...): their string literals need not be in the catalog."""


@dataclass(frozen=True)
class Finding:
    where: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


def _files() -> list[pathlib.Path]:
    return sorted(
        p for d in SCANNED for p in (ROOT / d).rglob("*.py") if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))
    )


def _name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


class _Module:
    def __init__(self, path: pathlib.Path):
        self.path = path
        self.rel = path.relative_to(ROOT).as_posix()
        self.tree = ast.parse(path.read_text(), str(path))
        self.constants = {
            t.id: n.value.value
            for n in self.tree.body
            if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
            for t in n.targets
            if isinstance(t, ast.Name)
        }
        self.tables = {
            t.id: n.value.values
            for n in self.tree.body
            if isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict)
            for t in n.targets
            if isinstance(t, ast.Name)
        }
        self.imports = {
            a.asname or a.name: (n.module, a.name)
            for n in ast.walk(self.tree)
            if isinstance(n, ast.ImportFrom) and n.module
            for a in n.names
        }

    def function_of(self, node: ast.AST) -> str:
        inner = [
            fn
            for fn in ast.walk(self.tree)
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
            and fn.lineno <= node.lineno <= (fn.end_lineno or fn.lineno)
        ]
        return inner[-1].name if inner else "<module>"


def _error_classes(modules: list[_Module]) -> set[str]:
    """shared.errors' classes and every class deriving from one of them (by name, to a fixed point)."""
    classes, grew = set(_BASES), True
    while grew:
        grew = False
        for m in modules:
            for c in ast.walk(m.tree):
                if isinstance(c, ast.ClassDef) and c.name not in classes and any(_name(b) in classes for b in c.bases):
                    classes.add(c.name)
                    grew = True
    return classes


def _forwarders(modules: list[_Module], classes: set[str]) -> dict[str, int | None]:
    """Helpers with a `reason` parameter they pass on as an error's reason: name -> its position (None: kw only)."""
    out: dict[str, int | None] = {}
    for m in modules:
        for fn in ast.walk(m.tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            params = [a.arg for a in fn.args.args]
            kwonly = [a.arg for a in fn.args.kwonlyargs]
            if "reason" not in params and "reason" not in kwonly:
                continue
            if any(
                isinstance(c, ast.Call)
                and _name(c.func) in classes
                and any(
                    k.arg == "reason" and isinstance(k.value, ast.Name) and k.value.id == "reason" for k in c.keywords
                )
                for c in ast.walk(fn)
            ):
                out[fn.name] = (
                    params.index("reason") - (1 if params and params[0] in ("self", "cls") else 0)
                    if "reason" in params
                    else None
                )
    return out


def scan() -> tuple[list[Finding], set[str]]:
    """(problems, every reason found) over the scanned trees."""
    modules = [_Module(p) for p in _files()]
    by_module = {m.rel.removesuffix(".py").replace("/", ".").removesuffix(".__init__"): m for m in modules}
    classes = _error_classes(modules)
    forwarders = _forwarders(modules, classes)
    problems: list[Finding] = []
    seen: set[str] = set()

    def resolve(m: _Module, value: ast.expr, depth: int = 0) -> str | None:
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            return value.value
        if isinstance(value, ast.Attribute) and _name(value.value) in ("Reason", "ErrorReason"):
            return value.attr
        if isinstance(value, ast.Name) and depth < 3:
            if value.id in m.constants:
                return m.constants[value.id]
            if value.id in m.imports:
                module, name = m.imports[value.id]
                other = by_module.get(module)
                if other is not None and name in other.constants:
                    return other.constants[name]
        return None

    def check(m: _Module, node: ast.AST, value: ast.expr, *, forwarded_param: bool) -> None:
        if isinstance(value, ast.IfExp):  # reason="A" if ... else "B": both must be in the catalog
            check(m, node, value.body, forwarded_param=forwarded_param)
            check(m, node, value.orelse, forwarded_param=forwarded_param)
            return
        table = (
            value.value
            if isinstance(value, ast.Subscript)
            else value.func.value
            if isinstance(value, ast.Call) and _name(value.func) == "get" and isinstance(value.func, ast.Attribute)
            else None
        )
        if isinstance(table, ast.Name) and table.id in m.tables:  # _REASONS[key] / _REASONS.get(key, default)
            for option in [*m.tables[table.id], *(value.args[1:] if isinstance(value, ast.Call) else [])]:
                check(m, node, option, forwarded_param=False)
            return
        where = f"{m.rel}:{node.lineno}"
        reason = resolve(m, value)
        if reason is None:
            if forwarded_param and isinstance(value, ast.Name) and value.id == "reason":
                return  # a helper's parameter: its callers are checked
            fn = m.function_of(node)
            if (m.rel, fn) in PASS_THROUGH or (m.rel, "*") in PASS_THROUGH:
                return
            problems.append(
                Finding(
                    where,
                    f"reason {ast.unparse(value)!r} is not a catalog name this scan can "
                    "resolve: use Reason.X (shared.errors) or a literal from the catalog",
                )
            )
            return
        seen.add(reason)
        if reason not in errors.REASONS:
            problems.append(
                Finding(
                    where,
                    f"reason {reason!r} is not in the catalog (protos/bulkhead/common/v1/errors.proto ErrorReason)",
                )
            )

    for m in modules:
        for node in ast.walk(m.tree):
            if isinstance(node, ast.ClassDef) and node.name in classes:
                for stmt in node.body:
                    if isinstance(stmt, ast.Assign) and any(_name(t) == "default_reason" for t in stmt.targets):
                        check(m, stmt, stmt.value, forwarded_param=False)
            if not isinstance(node, ast.Call):
                continue
            name = _name(node.func)
            reason_kw = next((k.value for k in node.keywords if k.arg == "reason"), None)
            if name in classes:
                if reason_kw is not None:
                    check(m, node, reason_kw, forwarded_param=True)
            elif name in forwarders:
                position = forwarders[name]
                value = (
                    reason_kw
                    if reason_kw is not None
                    else node.args[position]
                    if position is not None and position < len(node.args)
                    else None
                )
                if value is not None:
                    check(m, node, value, forwarded_param=True)
            elif (
                name not in NOT_ERRORS
                and isinstance(reason_kw, ast.Constant)
                and isinstance(reason_kw.value, str)
                and _UPPER.match(reason_kw.value)
            ):
                check(m, node, reason_kw, forwarded_param=False)  # e.g. PolicyViolation(reason="MODEL_NOT_ALLOWED")
    return problems, seen


def test_every_reason_in_the_code_is_in_the_catalog():
    problems, seen = scan()
    assert not problems, "reasons outside the catalog:\n" + "\n".join(map(str, problems))
    assert len(seen) > 100  # the scan does find the reasons (it is not vacuously clean)


def test_the_scan_names_file_and_line_of_an_unknown_reason(tmp_path, monkeypatch):
    """A new reason that is not in the catalog fails, naming where; so does one the scan cannot resolve."""
    pkg = tmp_path / "services" / "fake"
    pkg.mkdir(parents=True)
    (pkg / "handler.py").write_text(
        "from shared.errors import NotFound, Reason\n"
        "def a():\n    raise NotFound('x', reason='THREAD_NOT_FOUND')\n"
        "def b():\n    raise NotFound('x', reason='THREAD_MISSING')\n"
        "def c(what):\n    raise NotFound('x', reason=f'{what}_MISSING')\n"
        "def d():\n    raise NotFound('x', reason=Reason.NOPE)\n"
        "def bad(field, reason):\n    return NotFound('x', reason=reason)\n"
        "def e():\n    raise bad('f', 'ALSO_UNKNOWN')\n"
    )
    for d in ("shared", "console"):
        (tmp_path / d).mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    problems, seen = scan()
    assert sorted(p.where for p in problems) == [
        "services/fake/handler.py:13",
        "services/fake/handler.py:5",
        "services/fake/handler.py:7",
        "services/fake/handler.py:9",
    ]
    assert "THREAD_NOT_FOUND" in seen


def test_the_catalog_is_the_proto_enum_and_constructors_refuse_anything_else():
    values = errors_pb2.ErrorReason.DESCRIPTOR.values
    assert set(errors.REASONS) == {v.name for v in values if v.number and not v.GetOptions().deprecated}
    with pytest.raises(ValueError):
        errors.InvalidArgument("x", reason="BAD_PAGE_TOKEN")  # deprecated: INVALID_PAGE_TOKEN replaced it
    assert errors_pb2.ErrorReason.Name(0) == "ERROR_REASON_UNSPECIFIED"
    assert errors.NotFound("x", reason=errors.Reason.THREAD_NOT_FOUND).reason == "THREAD_NOT_FOUND"
    assert errors.NotFound("x", reason="THREAD_NOT_FOUND").reason == "THREAD_NOT_FOUND"
    for cls in (errors.InvalidArgument, errors.NotFound, errors.ResourceExhausted, errors.Unavailable):
        assert cls("x").reason in errors.REASONS  # every class default is a catalog member
        with pytest.raises(ValueError, match="TENANT_ID_INVALID"):
            cls("x", reason="TENANT_ID_INVALID")  # folded into INVALID_TENANT_ID
    assert errors.catalog_reason("CANCELLED") is None and errors.catalog_reason("TOKEN_EXPIRED") == "TOKEN_EXPIRED"


def test_every_catalog_value_says_when_it_is_used():
    """Each value has a comment in errors.proto: what it means and what the caller should do."""
    text = (ROOT / "protos/bulkhead/common/v1/errors.proto").read_text().splitlines()
    for i, line in enumerate(text):
        m = re.match(r"\s+([A-Z][A-Z0-9_]*) = \d+", line)
        if m:
            assert text[i - 1].strip().startswith("//"), f"ErrorReason {m.group(1)} has no comment"


@pytest.mark.parametrize(("reason", "caught"), [("THREAD_NOT_FOUND", False), ("THREAD_GONE", True)])
async def test_the_isolation_matrix_refuses_a_reason_outside_the_catalog(reason: str, caught: bool):
    """matrix.invoke (every attack-matrix cell and fuzzed call) checks the reason each reply carries, so a
    reason that bypassed shared.errors (a hand-built status) fails those suites, naming the RPC."""
    import grpc
    from google.rpc import error_details_pb2, status_pb2

    from tests.isolation.matrix import invoke
    from tests.isolation.methods import enumerate_rpcs

    rpc = next(r for r in enumerate_rpcs() if r.path == "/bulkhead.state.v1.StateService/GetThread")
    status = status_pb2.Status(code=grpc.StatusCode.NOT_FOUND.value[0], message="gone")
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain=errors.ERROR_DOMAIN))

    async def handler(request, context):
        await context.abort(
            grpc.StatusCode.NOT_FOUND,
            "gone",
            trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),),
        )

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "bulkhead.state.v1.StateService", {"GetThread": grpc.unary_unary_rpc_method_handler(handler)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = rpc.request_class()()
            if caught:
                with pytest.raises(AssertionError, match=f"GetThread answered NOT_FOUND with reason '{reason}'"):
                    await invoke(channel, rpc, request, ())
            else:
                assert (await invoke(channel, rpc, request, ())).status == f"NOT_FOUND/{reason}"
    finally:
        await server.stop(None)


def test_the_contract_names_only_catalog_reasons():
    """docs/CONTRACT.md's reasons (upper-case names in backticks) are catalog members, so a renamed or
    folded reason cannot live on in the docs."""
    not_reasons = {"DELETED", "DELETING", "IDEMPOTENT", "REGION_MAIN", "SECURITY_EVENTS_METADATA", "SERVICE_PRINCIPALS"}
    named = set(re.findall(r"`([A-Z][A-Z0-9_]{3,})`", (ROOT / "docs" / "CONTRACT.md").read_text()))
    reasons = {n for n in named if not n.startswith("BULKHEAD_") and n not in not_reasons}
    assert len(reasons) > 10 and reasons <= errors.REASONS, sorted(reasons - errors.REASONS)

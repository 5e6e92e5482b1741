"""The attack matrix's rig (one mesh per module) and its printout in the CI log."""

from __future__ import annotations

from collections import Counter

import pytest_asyncio

from .matrix import ATTACK_NAMES, Matrix
from .rig import running_rig

# The matrix each run produced, printed at the end of the session whatever -s says.
PRINTED: list[Matrix] = []
NOTES: list[str] = []
FUZZED: Counter = Counter()
"""(kind, status) -> how many fuzz examples got it; kind is "request" or "metadata"."""
FUZZED_RPCS: dict[str, set[str]] = {"request": set(), "metadata": set()}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig(request, tmp_path_factory):
    """Six services, tenants A, B and suspended C, every token minted once."""
    async with running_rig(tmp_path_factory.mktemp("isolation")) as r:
        NOTES.append(
            f"{request.module.__name__.rsplit('.', 1)[-1]}: refused by all six services after: "
            + ", ".join(f"{what} {seconds:.2f} s" for what, seconds in r.propagation.items())
        )
        yield r


_SHORT = {
    "OK": "OK",
    "NOT_FOUND": "NF",
    "PERMISSION_DENIED": "PD",
    "UNAUTHENTICATED": "UA",
    "INVALID_ARGUMENT": "IA",
    "FAILED_PRECONDITION": "FP",
    "ALREADY_EXISTS": "AE",
}


def _label(key: str) -> str:
    """Service.Method, after the serving service for a common contract ("orchestrator:/bulkhead.common...")."""
    served_by, _, path = key.partition(":/")
    return f"{served_by} {path.rsplit('.', 1)[-1]}" if path else key.rsplit(".", 1)[-1]


def render(matrix: Matrix) -> list[str]:
    """method × attack -> status code (a trailing ! marks a wrong cell), then the counts."""
    methods = sorted({rpc for rpc, _ in matrix.cells})
    width = max(len(_label(m)) for m in methods)
    cols = [n for n in ATTACK_NAMES if any(a == n for _, a in matrix.cells)]
    lines = [
        "attack matrix: method × attack -> status (UA unauthenticated, PD permission denied, NF not found, "
        "- not applicable, ! wrong)",
        " " * width + " " + " ".join(f"{i:>3}" for i in range(len(cols))),
    ]
    for m in methods:
        row = []
        for a in cols:
            cell = matrix.cells.get((m, a))
            mark = "-" if cell is None else _SHORT.get(cell.status.partition("/")[0], "??") + ("" if cell.ok else "!")
            row.append(f"{mark:>3}")
        lines.append(f"{_label(m):<{width}} " + " ".join(row))
    lines.append("columns: " + ", ".join(f"{i}={a}" for i, a in enumerate(cols)))
    lines.append(
        f"cells: {len(matrix.cells)} over {len(methods)} methods and {len(cols)} attacks; "
        f"right: {len(matrix.cells) - len(matrix.failures)}; wrong: {len(matrix.failures)}"
    )
    for (attack, status), n in sorted(matrix.counts().items()):
        lines.append(f"  {attack:<18} {status:<40} {n}")
    return lines


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the matrix, and what the fuzzer sent, into the CI log."""
    for matrix in PRINTED:
        terminalreporter.section("isolation attack matrix")
        for line in [*render(matrix), *NOTES]:
            terminalreporter.write_line(line)
    if FUZZED:
        terminalreporter.section("isolation fuzzing")
        for kind in ("request", "metadata"):
            total = sum(n for (k, _), n in FUZZED.items() if k == kind)
            if not total:
                continue
            terminalreporter.write_line(f"{kind}: {total} examples over {len(FUZZED_RPCS[kind])} RPCs")
            for (k, status), n in sorted(FUZZED.items()):
                if k == kind:
                    terminalreporter.write_line(f"  {status:<48} {n}")

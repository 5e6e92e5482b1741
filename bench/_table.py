"""bench/all.py's one table: every figure, its target and verdict, under a line naming the machine."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import platform

from bench._targets import TARGETS, Figures, Target, number, unit_of


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table."""

    key: str
    """`<bench>.<name>`: the figure in results.json (not shown in the table)."""
    figure: str
    """What a reader sees: `<bench>: <label>` for a target, else the key."""
    value: str
    """The figure with its unit, or why there is none."""
    target: str
    """The bound, empty for a figure no target covers."""
    verdict: str
    """met, missed or n/a."""


def machine(cpuinfo: str | None = None) -> dict[str, object]:
    """Cores, CPU model and Python of this machine, and its load when the run started."""
    if cpuinfo is None:
        path = pathlib.Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
        platform.processor() or "unknown CPU",
    )
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "load_average": round(os.getloadavg()[0], 2),
    }


def machine_line(info: dict[str, object]) -> str:
    """The line above the table: figures mean little without the machine they ran on."""
    return (
        f"machine: {info['cores']} cores, {info['cpu']}, Python {info['python']}; "
        f"load average {info['load_average']} at start"
    )


def collect(per_bench: dict[str, Figures]) -> Figures:
    """One flat `<bench>.<name>` mapping from each bench script's own figures."""
    return {f"{bench}.{name}": value for bench, figures in per_bench.items() for name, value in figures.items()}


def _value(figure: str, figures: Figures) -> str:
    value = figures.get(figure)
    return "-" if value is None else f"{number(value)}{unit_of(figure)}"


def rows(figures: Figures, benches: list[str], targets: tuple[Target, ...] = TARGETS) -> list[Row]:
    """Bench by bench: its targets first (judged, n/a when not measured), then its other figures."""
    out = []
    for bench in benches:
        own = [t for t in targets if t.figure.startswith(bench + ".")]
        for t in own:
            out.append(
                Row(t.figure, f"{bench}: {t.label}", _value(t.figure, figures), t.describe(figures), t.verdict(figures))
            )
        judged = {t.figure for t in own}
        for name in sorted(f for f in figures if f.startswith(bench + ".") and f not in judged):
            out.append(Row(name, name, _value(name, figures), "-", "n/a"))
    return out


def render(table: list[Row], info: dict[str, object], *, note: str = "") -> str:
    """The table as text, machine line on top, a tally of verdicts below."""
    head = Row("", "figure", "value", "target", "verdict")
    shown = ("figure", "value", "target", "verdict")
    widths = [max(len(getattr(r, name)) for r in [head, *table]) for name in shown]
    lines = [machine_line(info)] + ([note] if note else [])
    for r in [head, *table]:
        cells = [getattr(r, name) for name in shown]
        lines.append(
            "  ".join(
                c.ljust(w) if i != 1 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()
        )
        if r is head:
            lines.append("  ".join("-" * w for w in widths))
    judged = [r for r in table if r.target != "-"]
    tally = {v: sum(r.verdict == v for r in judged) for v in ("met", "missed", "n/a")}
    lines.append(f"targets: {tally['met']} met, {tally['missed']} missed, {tally['n/a']} n/a")
    return "\n".join(lines)

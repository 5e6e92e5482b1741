"""bench/all.py's bookkeeping: targets and verdicts, the table, the JSON hand-off and the commands.

Running the benches themselves is minutes long and not for CI; this covers the logic around them.
"""

from __future__ import annotations

import json
import math
import pathlib

import pytest

from bench import _figures
from bench._table import Row, collect, machine, render, rows
from bench._targets import TARGETS, Target
from bench.all import BENCHES, command

INFO = {"cores": 2, "cpu": "Test CPU @ 2.0GHz", "python": "3.11.7", "load_average": 0.5}


def test_upper_bound_met_at_the_bound_and_missed_above():
    """A <= target is met at and under its limit, missed above it."""
    t = Target("x.cpu_ms", "cpu", "<=", 0.8)
    assert t.verdict({"x.cpu_ms": 0.8}) == "met"
    assert t.verdict({"x.cpu_ms": 0.5}) == "met"
    assert t.verdict({"x.cpu_ms": 0.81}) == "missed"


def test_lower_bound_met_at_the_bound_and_missed_below():
    """A >= target is met at and over its limit, missed below it."""
    t = Target("x.reads_per_s", "reads", ">=", 3000)
    assert t.verdict({"x.reads_per_s": 3000}) == "met"
    assert t.verdict({"x.reads_per_s": 2999.9}) == "missed"


@pytest.mark.parametrize("figures", [{}, {"x.cpu_ms": None}, {"x.cpu_ms": math.nan}])
def test_unmeasured_figure_is_not_applicable(figures):
    """A figure a bench did not write (failed, skipped, null, NaN) is n/a, never met."""
    assert Target("x.cpu_ms", "cpu", "<=", 0.8).verdict(figures) == "n/a"


def test_relative_bound_adds_the_baseline_measured_in_the_same_run():
    """`plus` makes the bound baseline + limit: added p50 <= bare hop + 0.2 ms."""
    t = Target("p.added_ms", "added", "<=", 0.2, plus="p.hop_ms")
    assert t.verdict({"p.added_ms": 1.40, "p.hop_ms": 1.25}) == "met"
    assert t.verdict({"p.added_ms": 1.50, "p.hop_ms": 1.25}) == "missed"
    assert t.verdict({"p.added_ms": 1.40}) == "n/a"
    assert t.describe({"p.hop_ms": 1.25}) == "<= 1.45 ms (1.25 + 0.2)"
    assert t.describe({}) == "<= p.hop_ms + 0.2 ms"


def test_unknown_operator_is_refused():
    """A typo in a target's operator fails when the target is defined, not as a silent verdict."""
    with pytest.raises(ValueError):
        Target("x.a", "a", "<", 1)


def test_rows_put_each_benchs_targets_before_its_other_figures():
    """Bench by bench, in run order: targets judged first, then the rest, which have no verdict."""
    targets = (Target("b.lat_ms", "latency", "<=", 10), Target("a.rate_per_s", "rate", ">=", 100))
    figures = collect({"a": {"rate_per_s": 50.0, "extra_mb": 12.0}, "b": {"lat_ms": 5.0}})
    table = rows(figures, ["a", "b"], targets)
    assert [(r.key, r.verdict) for r in table] == [
        ("a.rate_per_s", "missed"),
        ("a.extra_mb", "n/a"),
        ("b.lat_ms", "met"),
    ]
    assert table[0] == Row("a.rate_per_s", "a: rate", "50.0/s", ">= 100/s", "missed")
    assert rows(figures, ["b"], (Target("b.lat_ms", "latency", "<=", 1500),))[0].target == "<= 1,500 ms"
    assert table[1].target == "-" and table[1].value == "12.0 MB"


def test_target_a_failed_bench_left_unmeasured_stays_in_the_table():
    """A bench that wrote nothing still lists its targets, as n/a, so the gap is visible."""
    table = rows({}, ["proxy"])
    assert [r.key for r in table] == [t.figure for t in TARGETS if t.figure.startswith("proxy.")]
    assert {(r.value, r.verdict) for r in table} == {("-", "n/a")}


def test_render_puts_the_machine_on_top_and_tallies_verdicts():
    """The machine line comes first, then the header; the last line counts verdicts of targets only."""
    table = [
        Row("a.x_ms", "a: x", "1.00 ms", "<= 2 ms", "met"),
        Row("a.y_ms", "a: y", "3.00 ms", "<= 2 ms", "missed"),
        Row("a.z_ms", "a: z", "-", "<= 2 ms", "n/a"),
        Row("a.w", "a.w", "4.00", "-", "n/a"),
    ]
    lines = render(table, INFO, note="quick").splitlines()
    assert lines[0] == "machine: 2 cores, Test CPU @ 2.0GHz, Python 3.11.7; load average 0.5 at start"
    assert lines[1] == "quick"
    assert lines[2].split() == ["figure", "value", "target", "verdict"]
    assert lines[4].startswith("a: x") and lines[4].endswith("met")
    assert lines[-1] == "targets: 1 met, 1 missed, 1 n/a"


def test_machine_reads_the_cpu_model():
    """The CPU model comes from /proc/cpuinfo's `model name`."""
    info = machine("processor\t: 0\nmodel name\t: Test CPU @ 2.0GHz\n")
    assert info["cpu"] == "Test CPU @ 2.0GHz" and info["cores"] >= 1


def test_figures_json_writes_nulls_for_missing_and_nan(tmp_path):
    """What a bench writes with --json: numbers rounded, None and NaN as null; nothing without --json."""
    out = tmp_path / "f.json"
    _figures.write_json(str(out), {"a_ms": 1.234567, "b_ratio": math.nan, "c_per_s": None, "d": 3})
    assert json.loads(out.read_text()) == {"a_ms": 1.2346, "b_ratio": None, "c_per_s": None, "d": 3.0}
    _figures.write_json(None, {"a_ms": 1.0})
    assert list(tmp_path.iterdir()) == [out]


def test_collect_prefixes_each_figure_with_its_bench():
    """Figures from two benches with the same name stay apart."""
    assert collect({"a": {"x": 1.0}, "b": {"x": 2.0}}) == {"a.x": 1.0, "b.x": 2.0}


def test_command_bounds_each_bench_and_asks_for_json(tmp_path):
    """Quick and full runs use the bench's own arguments; only the proxy bench gets the peer."""
    proxy = next(b for b in BENCHES if b.name == "proxy")
    state = next(b for b in BENCHES if b.name == "state")
    out = tmp_path / "p.json"
    full = command(proxy, quick=False, peer="litellm", json_to=out)
    assert full[1].endswith("bench/proxy.py")
    assert full[2:] == [*proxy.full, "--peer", "litellm", "--json", str(out)]
    assert command(proxy, quick=True, peer=None, json_to=out)[2:] == [*proxy.quick, "--json", str(out)]
    assert "--peer" not in command(state, quick=False, peer="litellm", json_to=out)


def test_a_bench_can_run_another_benchs_script_with_its_own_arguments(tmp_path):
    """proxy_direct is bench/proxy.py on the opt-in transport; its figures stay apart from proxy's."""
    direct = next(b for b in BENCHES if b.name == "proxy_direct")
    cmd = command(direct, quick=False, peer="litellm", json_to=tmp_path / "d.json")
    assert cmd[1].endswith("bench/proxy.py")
    assert cmd[2:] == [*direct.full, "--json", str(tmp_path / "d.json")]
    assert "--transport" in direct.full and "--peer" not in cmd


def test_every_target_names_a_bench_that_writes_json():
    """Each target's figure belongs to a bench all.py runs, and every bench script offers --json."""
    names = {b.name for b in BENCHES}
    assert {t.figure.split(".")[0] for t in TARGETS} <= names
    bench_dir = pathlib.Path(__file__).resolve().parents[2] / "bench"
    for bench in BENCHES:
        assert "add_json_option(parser)" in (bench_dir / bench.file).read_text(), bench.name

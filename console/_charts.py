"""Small server-rendered SVG charts: no script, no CDN, readable by screen readers (role=img + title)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from markupsafe import Markup, escape

PALETTE = ("#2563eb", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#0ea5e9")
_ids = itertools.count(1)


def _fmt(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value:.1f}%"
    if unit == "$":
        return f"${value:,.4f}" if value < 1 else f"${value:,.2f}"
    if unit == "ms":
        return f"{value:,.0f} ms"
    return f"{value:,.0f}{(' ' + unit) if unit else ''}"


def bars(
    title: str,
    items: Sequence[tuple[str, float]],
    *,
    unit: str = "",
    max_value: float | None = None,
    series: Sequence[str] = (),
    values: Sequence[Sequence[float]] = (),
) -> Markup:
    """Horizontal bars, one row per label; with `series`/`values`, one bar per series inside each row."""
    if not series:
        series, values = ("",), [[v] for _, v in items]
    labels = [label for label, _ in items] if items else []
    cid = f"c{next(_ids)}"
    if not labels:
        return Markup(
            f'<svg class="chart" role="img" aria-labelledby="{cid}" width="520" height="40">'
            f'<title id="{cid}">{escape(title)}: no data</title>'
            '<text x="8" y="24" class="muted">no data in this period</text></svg>'
        )
    top = max([max_value or 0.0, *(v for row in values for v in row)]) or 1.0
    bar_h, gap, label_w, width = 14, 8, 150, 520
    row_h = bar_h * len(series) + gap
    legend_h = 18 if len(series) > 1 else 0
    height = legend_h + row_h * len(labels) + 6
    out = [
        f'<svg class="chart" role="img" aria-labelledby="{cid}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"><title id="{cid}">{escape(title)}</title>'
    ]
    if legend_h:
        for i, name in enumerate(series):
            out.append(
                f'<rect x="{label_w + i * 110}" y="3" width="10" height="10" fill="{PALETTE[i]}"/>'
                f'<text x="{label_w + i * 110 + 14}" y="12" class="legend">{escape(name)}</text>'
            )
    span = width - label_w - 90
    for r, label in enumerate(labels):
        y0 = legend_h + r * row_h
        out.append(
            f'<text x="{label_w - 6}" y="{y0 + bar_h * len(series) / 2 + 4:.0f}" text-anchor="end" '
            f'class="label">{escape(label[:22])}</text>'
        )
        for s, value in enumerate(values[r]):
            w = max(1.0, span * value / top) if value else 0
            y = y0 + s * bar_h
            name = f"{series[s]} " if series[s] else ""
            out.append(
                f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" fill="{PALETTE[s]}">'
                f"<title>{escape(label)}: {escape(name)}{_fmt(value, unit)}</title></rect>"
                f'<text x="{label_w + w + 4:.1f}" y="{y + bar_h - 4}" class="value">{_fmt(value, unit)}</text>'
            )
    out.append("</svg>")
    return Markup("".join(out))


def columns(title: str, items: Sequence[tuple[str, float]], *, unit: str = "") -> Markup:
    """Vertical columns over time (e.g. one per day), labelled below."""
    cid = f"c{next(_ids)}"
    if not items:
        return bars(title, [])
    width, height, base, left = 520, 180, 150, 8
    top = max(v for _, v in items) or 1.0
    step = (width - left * 2) / len(items)
    w = max(2.0, step * 0.7)
    out = [
        f'<svg class="chart" role="img" aria-labelledby="{cid}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"><title id="{cid}">{escape(title)}</title>',
        f'<line x1="{left}" y1="{base}" x2="{width - left}" y2="{base}" class="axis"/>',
    ]
    every = max(1, len(items) // 8)
    for i, (label, value) in enumerate(items):
        h = (base - 20) * value / top
        x = left + i * step + (step - w) / 2
        out.append(
            f'<rect x="{x:.1f}" y="{base - h:.1f}" width="{w:.1f}" height="{h:.1f}" fill="{PALETTE[0]}">'
            f"<title>{escape(label)}: {_fmt(value, unit)}</title></rect>"
        )
        if i % every == 0:
            out.append(
                f'<text x="{x + w / 2:.1f}" y="{base + 14}" text-anchor="middle" class="label">'
                f"{escape(label[5:] if len(label) == 10 else label)}</text>"
            )
    out.append(f'<text x="{left}" y="12" class="value">max {_fmt(top, unit)}</text></svg>')
    return Markup("".join(out))


def meter(title: str, used: float, held: float, limit: float, *, unit: str = "") -> Markup:
    """A budget as one stacked bar: used, held by open reservations, and the headroom left."""
    cid = f"c{next(_ids)}"
    width, span = 520, 500
    limit = limit or 1.0
    u = min(span, span * used / limit)
    h = min(span - u, span * held / limit)
    return Markup(
        f'<svg class="chart" role="img" aria-labelledby="{cid}" width="{width}" height="46" viewBox="0 0 {width} 46">'
        f'<title id="{cid}">{escape(title)}: used {_fmt(used, unit)}, held {_fmt(held, unit)}, '
        f"limit {_fmt(limit, unit)}</title>"
        f'<rect x="10" y="6" width="{span}" height="18" fill="#e5e7eb"/>'
        f'<rect x="10" y="6" width="{u:.1f}" height="18" fill="{PALETTE[0] if used < limit else PALETTE[3]}"/>'
        f'<rect x="{10 + u:.1f}" y="6" width="{h:.1f}" height="18" fill="{PALETTE[1]}"/>'
        f'<text x="10" y="40" class="value">used {_fmt(used, unit)} · held {_fmt(held, unit)} · '
        f"headroom {_fmt(max(0.0, limit - used - held), unit)} of {_fmt(limit, unit)}</text></svg>"
    )

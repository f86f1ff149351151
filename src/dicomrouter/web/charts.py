"""Charts drawn on the server as inline SVG: pictures without a JavaScript library.

Each chart is a few dozen SVG elements computed from numbers the page already has,
so it costs nothing to refresh every few seconds and works offline. Every drawn
value also carries ``data-*`` attributes and a ``<title>`` (a tooltip), so the chart
can be read by a screen reader and checked by a test. Text goes through
:func:`markupsafe.escape`: destination names come from the configuration.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape


@dataclass(frozen=True)
class Series:
    key: str
    label: str
    css: str  # class name: its colour is in style.css


def _fmt(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _nice_max(value: float) -> float:
    """Round the axis maximum up to 1, 2 or 5 times a power of ten."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * power:
            return float(step * power)
    return float(10 * power)


def column_chart(
    points: Sequence[Mapping[str, float]],
    incoming: Series,
    outgoing: Sequence[Series],
    *,
    label: Callable[[float], str] = _fmt,
    title: str = "",
    width: int = 1200,
    height: int = 240,
) -> Markup:
    """Per time bucket, two columns side by side: what came in (``incoming``) and what
    went out (``outgoing`` stacked, e.g. delivered then failed), on one y axis from
    zero. Columns, not lines: traffic is bursty, and a burst in one bucket must not
    be drawn as a slope across its neighbours."""
    left, right, top, bottom = 44, 10, 24, 22
    plot_w, plot_h = width - left - right, height - top - bottom
    n = len(points)

    def value(point: Mapping[str, float], s: Series) -> float:
        return float(point.get(s.key, 0))

    peak = _nice_max(
        max(
            (max(value(p, incoming), sum(value(p, s) for s in outgoing)) for p in points),
            default=0,
        )
    )
    slot = plot_w / max(n, 1)
    column = max(1.0, slot * 0.4)

    def y(v: float) -> float:
        return top + plot_h - plot_h * v / peak

    parts = [
        f'<svg class="chart columns" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}" data-points="{n}">',
        f"<title>{escape(title)}</title>",
    ]
    for fraction in (0, 0.5, 1):
        gy = y(peak * fraction)
        parts.append(
            f'<line class="grid" x1="{left}" x2="{width - right}" y1="{gy:.1f}" y2="{gy:.1f}"/>'
            f'<text class="axis" x="{left - 6}" y="{gy + 4:.1f}" text-anchor="end">'
            f"{_fmt(peak * fraction)}</text>"
        )
    if n:
        for i, anchor in ((0, "start"), (n - 1, "end")):
            stamp = escape(label(float(points[i]["t"])))
            x = left + (i + (0 if anchor == "start" else 1)) * slot
            parts.append(
                f'<text class="axis" x="{x:.1f}" y="{height - 5}" '
                f'text-anchor="{anchor}">{stamp}</text>'
            )
    for s in (incoming, *outgoing):
        values = ",".join(_fmt(value(p, s)) for p in points)
        parts.append(
            f'<g class="{escape(s.css)}" data-series="{escape(s.key)}" data-values="{values}">'
        )
        for i, point in enumerate(points):
            v = value(point, s)
            if v <= 0:
                continue
            x = left + i * slot + (slot / 2 - column if s is incoming else slot / 2)
            base = (
                0.0
                if s is incoming
                else sum(value(point, o) for o in outgoing[: outgoing.index(s)])
            )
            stamp = escape(label(float(point["t"])))
            parts.append(
                f'<rect x="{x:.1f}" y="{y(base + v):.1f}" width="{column:.1f}" '
                f'height="{y(base) - y(base + v):.1f}"><title>{stamp} {escape(s.label)}: '
                f"{_fmt(v)}</title></rect>"
            )
        parts.append("</g>")
    legend_x = left + 4
    for s in (incoming, *outgoing):
        total = sum(value(p, s) for p in points)
        text = f"{s.label} ({_fmt(total)})"
        parts.append(
            f'<rect class="swatch {escape(s.css)}" x="{legend_x}" y="6" width="10" height="10"/>'
            f'<text class="legend" x="{legend_x + 14}" y="15">{escape(text)}</text>'
        )
        legend_x += 30 + 7 * len(text)
    parts.append("</svg>")
    return Markup("".join(parts))


def bar_chart(
    rows: Sequence[tuple[str, Mapping[str, float]]],
    segments: Sequence[Series],
    *,
    value_label: Callable[[float], str] = _fmt,
    title: str = "",
    width: int = 360,
    row_height: int = 24,
) -> Markup:
    """Horizontal stacked bars, one row per label, segments in ``segments`` order,
    all on one scale so rows compare at a glance; the total is written at the end."""
    label_w, value_w = 100, 56
    bar_w = width - label_w - value_w
    totals = [sum(float(values.get(s.key) or 0) for s in segments) for _, values in rows]
    # A row whose every value is None has no value (e.g. no failure rate when nothing
    # was sent): written "—", as the tables write it, not 0.
    unknown = [all(values.get(s.key) is None for s in segments) for _, values in rows]
    peak = max(totals, default=0) or 1.0
    height = max(1, len(rows)) * row_height + 4
    parts = [
        f'<svg class="chart bars" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}" data-rows="{len(rows)}">',
        f"<title>{escape(title)}</title>",
    ]
    if not rows:
        parts.append(f'<text class="empty" x="4" y="{row_height - 8}">nothing to show</text>')
    for index, ((name, values), total, none) in enumerate(zip(rows, totals, unknown, strict=True)):
        top = index * row_height + 2
        parts.append(
            f'<text class="label" x="{label_w - 6}" y="{top + row_height / 2 + 4:.1f}" '
            f'text-anchor="end">{escape(name)}</text>'
            f'<rect class="track" x="{label_w}" y="{top + 4}" width="{bar_w}" '
            f'height="{row_height - 8}" rx="3"/>'
        )
        offset = 0.0
        for s in segments:
            value = float(values.get(s.key) or 0)
            if value <= 0:
                continue
            w = max(1.5, bar_w * value / peak)
            parts.append(
                f'<rect class="bar {escape(s.css)}" x="{label_w + offset:.1f}" y="{top + 4}" '
                f'width="{w:.1f}" height="{row_height - 8}" rx="3" data-label="{escape(name)}" '
                f'data-segment="{escape(s.key)}" data-value="{_fmt(value)}"><title>'
                f"{escape(name)} {escape(s.label)}: {escape(value_label(value))}</title></rect>"
            )
            offset += w
        shown = "—" if none else escape(value_label(total))
        parts.append(
            f'<text class="value" x="{width - 4}" y="{top + row_height / 2 + 4:.1f}" '
            f'text-anchor="end" data-total="{"" if none else _fmt(total)}">{shown}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def gauge(used: float, total: float, watermark: float, *, title: str = "") -> Markup:
    """A half-circle gauge of how full the disk is, with the free-space watermark
    marked: the needle turns red once free space is below the watermark."""
    fraction = min(1.0, max(0.0, used / total)) if total > 0 else 0.0
    limit = min(1.0, max(0.0, 1 - watermark / total)) if total > 0 else 1.0
    cx, cy, r = 100, 100, 80

    def point(f: float) -> tuple[float, float]:
        angle = math.pi * (1 - f)
        return cx + r * math.cos(angle), cy - r * math.sin(angle)

    def arc(start: float, end: float, css: str) -> str:
        (x1, y1), (x2, y2) = point(start), point(end)
        return f'<path class="{css}" d="M {x1:.1f} {y1:.1f} A {r} {r} 0 0 1 {x2:.1f} {y2:.1f}"/>'

    state = "bad" if fraction >= limit else "good"
    parts = [
        f'<svg class="chart gauge" viewBox="0 0 200 120" role="img" aria-label="{escape(title)}" '
        f'data-used="{fraction:.4f}" data-limit="{limit:.4f}">',
        f"<title>{escape(title)}</title>",
        arc(0, 1, "gauge-track"),
    ]
    if fraction > 0:
        parts.append(arc(0, fraction, f"gauge-fill {state}"))
    mx, my = point(limit)
    parts.append(
        f'<line class="gauge-mark" x1="{cx + (mx - cx) * 0.8:.1f}" y1="{cy + (my - cy) * 0.8:.1f}" '
        f'x2="{cx + (mx - cx) * 1.12:.1f}" y2="{cy + (my - cy) * 1.12:.1f}"/>'
        f'<text class="gauge-value" x="{cx}" y="{cy - 8}" text-anchor="middle">'
        f"{fraction * 100:.0f}%</text>"
        f'<text class="axis" x="{cx}" y="{cy + 14}" text-anchor="middle">used</text></svg>'
    )
    return Markup("".join(parts))

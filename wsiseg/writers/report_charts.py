"""Histograms of nucleus measurements for the per-slide report, as inline SVG (text, no images).

One chart per measurement: all nuclei as bars, plus one step line per class when the model
has several.  Values beyond the shown range are counted in the end bars (and the caption
says how many).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from wsiseg.writers.report_images import nice_ceiling

__all__ = ["ClassInfo", "histogram_svg"]

_W, _H = 380, 190
_LEFT, _RIGHT, _TOP, _BOTTOM = 52, 14, 10, 36


@dataclass(frozen=True)
class ClassInfo:
    """A nucleus class as the report shows it: id, name, colour (RGB 0-255)."""

    id: int
    name: str
    rgb: tuple[int, int, int]

    @property
    def css(self) -> str:
        return "rgb({},{},{})".format(*self.rgb)


def _tick(value: float, span: float) -> str:
    if span >= 20:
        return f"{value:,.0f}"
    if span >= 2:
        return f"{value:,.1f}"
    return f"{value:,.2f}"


def histogram_svg(
    values: np.ndarray,
    class_id: np.ndarray,
    classes: Sequence[ClassInfo],
    *,
    label: str,
    value_range: tuple[float | None, float | None] = (None, None),
    bins: int = 40,
) -> tuple[str, str]:
    """(svg markup, caption note) for a histogram of `values`.

    values: (N,) finite floats (others dropped); class_id: (N,) ints.  label: the x-axis title
    with its unit, e.g. "area (µm²)".  value_range: (lo, hi); a None end becomes 0 (lo, when
    every value is >= 0) or the 0.5th / 99.5th percentile.  The note says how many values lie
    outside the range ("" when none).
    """
    v = np.asarray(values, np.float64).reshape(-1)
    cid = np.asarray(class_id).reshape(-1)
    keep = np.isfinite(v)
    v, cid = v[keep], cid[keep]
    if not len(v):
        return "", "no values"
    lo, hi = value_range
    lo = float(lo if lo is not None else (0.0 if v.min() >= 0 else np.percentile(v, 0.5)))
    hi = float(hi if hi is not None else lo + 4 * nice_ceiling((np.percentile(v, 99.5) - lo) / 4))
    if not hi > lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    clipped = np.clip(v, lo, hi)
    n_out = int(((v < lo) | (v > hi)).sum())
    total = np.histogram(clipped, edges)[0]
    per_class = [(c, np.histogram(clipped[cid == c.id], edges)[0]) for c in classes] if len(classes) > 1 else []
    top = max(int(total.max()), 1)

    pw, ph = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def x_of(value: float) -> float:
        return _LEFT + (value - lo) / (hi - lo) * pw

    def y_of(count: float) -> float:
        return _TOP + ph * (1.0 - count / top)

    fill = classes[0].css if len(classes) == 1 else "#b8b8b8"
    parts = [f'<svg class="hist" width="{_W}" height="{_H}" '
             f'viewBox="0 0 {_W} {_H}" role="img" aria-label="{html.escape(label)}">']
    for i, n in enumerate(total):
        if n:
            x0, x1 = x_of(edges[i]), x_of(edges[i + 1])
            parts.append(f'<rect x="{x0:.1f}" y="{y_of(n):.1f}" width="{max(x1 - x0 - 0.5, 0.5):.1f}" '
                         f'height="{_TOP + ph - y_of(n):.1f}" fill="{fill}"/>')
    for c, counts in per_class:
        pts = [(x_of(lo), y_of(0))]
        for i, n in enumerate(counts):
            pts += [(x_of(edges[i]), y_of(n)), (x_of(edges[i + 1]), y_of(n))]
        pts.append((x_of(hi), y_of(0)))
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{c.css}" stroke-width="1.6"/>')
    base = _TOP + ph
    parts.append(f'<path d="M{_LEFT},{_TOP} V{base} H{_LEFT + pw}" fill="none" stroke="#444"/>')
    for k in range(5):
        value = lo + (hi - lo) * k / 4
        x = x_of(value)
        anchor = "start" if k == 0 else "end" if k == 4 else "middle"
        parts.append(f'<line x1="{x:.1f}" y1="{base}" x2="{x:.1f}" y2="{base + 4}" stroke="#444"/>'
                     f'<text x="{x:.1f}" y="{base + 15}" text-anchor="{anchor}">{_tick(value, hi - lo)}</text>')
    parts.append(f'<text x="{_LEFT + pw / 2:.1f}" y="{_H - 4}" text-anchor="middle">{html.escape(label)}</text>')
    parts.append(f'<text x="{_LEFT - 4}" y="{_TOP + 9}" text-anchor="end">{top:,}</text>'
                 f'<text x="{_LEFT - 4}" y="{base}" text-anchor="end">0</text>'
                 f'<text x="12" y="{_TOP + ph / 2:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {_TOP + ph / 2:.1f})">nuclei</text>')
    parts.append("</svg>")
    shown = f"{_tick(lo, hi - lo)}–{_tick(hi, hi - lo)}"
    note = f"{n_out:,} value{'s' if n_out != 1 else ''} outside {shown} counted in the end bars" if n_out else ""
    return "".join(parts), note

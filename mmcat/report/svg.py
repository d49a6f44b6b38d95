"""Inline SVG charts for the HTML reports: the confusion matrix, line charts of training curves and the
reliability diagram. Plain strings, no plotting library: the page stays small, sharp at any zoom and searchable
(class names are text, not pixels)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from mmcat.report.html import esc

PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d")


def _text_width(text: str, size: float) -> float:
    return 0.6 * size * len(text)  # a fair upper bound for proportional sans-serif fonts


def _blue(share: float) -> str:
    """White (0) to dark blue (1): the colour of a row share."""
    lo, hi = np.array([247, 251, 255]), np.array([8, 48, 107])
    r, g, b = (lo + float(share) * (hi - lo)).round().astype(int)
    return f"rgb({r},{g},{b})"


def confusion_svg(matrix: Sequence[Sequence[int]], labels: Sequence[str]) -> str:
    """Counts with row-normalised colour (the share of each true class predicted as each class), class names on
    both axes, axis titles and a colour scale. Cells shrink with the number of classes; counts are printed while
    cells are big enough to hold them, and every cell has a tooltip (true, predicted, count, share)."""
    m = np.asarray(matrix, dtype=np.int64)
    n = len(labels)
    cell = 44 if n <= 8 else 30 if n <= 16 else max(9, 520 // max(n, 1))  # many classes: a compact matrix
    font = max(8.0, min(12.0, cell * 0.75))
    label_w = max(_text_width(str(name), font) for name in labels) + 8 if n else 20
    left, top = label_w + 22, 10
    grid = n * cell
    angle = -45 if n <= 16 else -90  # vertical names where cells are narrower than a slanted line of text
    bottom = label_w * (0.72 if angle == -45 else 1.0) + 34  # the x labels, then the axis title
    legend_w = 70
    width, height = left + grid + legend_w, top + grid + bottom
    rows = m.sum(axis=1, keepdims=True)
    share = m / np.maximum(rows, 1)
    out = [f'<svg id="confusion-matrix" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="confusion matrix">']
    for i in range(n):
        for j in range(n):
            x, y, s = left + j * cell, top + i * cell, float(share[i, j])
            tip = f"true {labels[i]} \u2192 predicted {labels[j]}: {m[i, j]} ({s:.0%} of {rows[i, 0]})"
            out.append(f'<rect class="cm" x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{_blue(s)}" '
                       f'stroke="#fff" stroke-width="{1 if cell > 12 else 0.5}" data-count="{m[i, j]}">'
                       f"<title>{esc(tip)}</title></rect>")
            if cell >= 22 and m[i, j]:
                color = "#fff" if s > 0.5 else "#1d2330"
                out.append(f'<text x="{x + cell / 2}" y="{y + cell / 2 + font * 0.35:.1f}" font-size="{font:.1f}" '
                           f'text-anchor="middle" fill="{color}">{m[i, j]}</text>')
    for i, name in enumerate(labels):
        y = top + i * cell + cell / 2 + font * 0.35
        out.append(f'<text class="axis-y" x="{left - 5}" y="{y:.1f}" font-size="{font:.1f}" text-anchor="end">'
                   f"{esc(name)}</text>")
        x, y0 = left + i * cell + cell / 2 + font * 0.35, top + grid + 6
        out.append(f'<text class="axis-x" x="{x:.1f}" y="{y0}" font-size="{font:.1f}" text-anchor="end" '
                   f'transform="rotate({angle} {x:.1f} {y0})">{esc(name)}</text>')
    out.append(f'<text x="12" y="{top + grid / 2:.0f}" font-size="12" font-weight="600" text-anchor="middle" '
               f'transform="rotate(-90 12 {top + grid / 2:.0f})">true label</text>')
    out.append(f'<text x="{left + grid / 2:.0f}" y="{height - 6:.0f}" font-size="12" font-weight="600" '
               f'text-anchor="middle">predicted label</text>')
    out.append(_colour_scale(left + grid + 18, top, max(grid, 80)))
    out.append("</svg>")
    return "".join(out)


def _colour_scale(x: float, y: float, h: float) -> str:
    steps = 20
    parts = [f'<rect x="{x}" y="{y + (steps - 1 - k) * h / steps:.1f}" width="12" height="{h / steps + 0.5:.1f}" '
             f'fill="{_blue(k / (steps - 1))}"/>' for k in range(steps)]
    parts.append(f'<text x="{x + 16}" y="{y + 9}" font-size="10">100%</text>')
    parts.append(f'<text x="{x + 16}" y="{y + h:.0f}" font-size="10">0%</text>')
    parts.append(f'<text x="{x + 6}" y="{y + h + 14:.0f}" font-size="10" text-anchor="middle">of row</text>')
    return "".join(parts)


def _ticks(lo: float, hi: float) -> List[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * k / 4 for k in range(5)]


def _fmt(v: float) -> str:
    a = abs(v)
    return f"{v:.0f}" if a >= 100 or v == int(v) and a < 1e6 else f"{v:.3g}" if a >= 1e-3 else f"{v:.1e}"


def line_chart(title: str, series: Dict[str, List[Tuple[int, float]]], width: int = 360, height: int = 190,
               y_range: Optional[Tuple[float, float]] = None) -> str:
    """Lines over optimizer steps, one per series (points drawn while there are few), with min/max ticks."""
    pts = [(s, v) for values in series.values() for s, v in values]
    if not pts:
        return ""
    steps, vals = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = y_range or (min(vals), max(vals))
    if y1 <= y0:  # a constant: centre it in a band of 10 % of its value
        pad = abs(y0) * 0.1 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    left, right, top, bottom = 48, 10, 22, 30
    pw, ph = width - left - right, height - top - bottom

    def px(step: float, value: float) -> Tuple[float, float]:
        return left + (step - x0) / (x1 - x0) * pw, top + (1 - (value - y0) / (y1 - y0)) * ph

    out = [f'<svg class="chart" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">',
           f'<text x="{left}" y="14" font-size="12" font-weight="600">{esc(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#c9ced8"/>']
    for v in _ticks(y0, y1):
        _, y = px(x0, v)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eef0f4"/>'
                   f'<text x="{left - 4}" y="{y + 3:.1f}" font-size="9" text-anchor="end">{_fmt(v)}</text>')
    for s in (x0, x1):
        x, _ = px(s, y0)
        out.append(f'<text x="{x:.1f}" y="{top + ph + 12}" font-size="9" text-anchor="middle">{s}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 4}" font-size="9" text-anchor="middle">step</text>')
    for k, (name, values) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        coords = [px(s, v) for s, v in sorted(values)]
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" '
                   f'points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in coords)}"/>')
        if len(coords) <= 40:
            out.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.2" fill="{color}"/>' for x, y in coords)
        if len(series) > 1:
            out.append(f'<text x="{left + 6 + 90 * (k % 3)}" y="{top + 12 + 11 * (k // 3)}" font-size="9" '
                       f'fill="{color}">{esc(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def reliability_svg(bins: Sequence[Dict[str, float]], width: int = 300, height: int = 260) -> str:
    """Accuracy per confidence bin (bars) against the diagonal of perfect calibration; each bar's tooltip gives
    its count, mean confidence and accuracy."""
    left, right, top, bottom = 40, 10, 10, 34
    pw, ph = width - left - right, height - top - bottom
    out = [f'<svg id="reliability" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="reliability diagram">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#c9ced8"/>']
    n = len(bins)
    for k, b in enumerate(bins):
        if not b["count"]:
            continue
        x, w = left + k * pw / n, pw / n
        h = b["accuracy"] * ph
        tip = f"confidence {b['lo']:.2f}-{b['hi']:.2f}: {b['count']} samples, mean confidence " \
              f"{b['confidence']:.3f}, accuracy {b['accuracy']:.3f}"
        out.append(f'<rect x="{x + 1:.1f}" y="{top + ph - h:.1f}" width="{w - 2:.1f}" height="{h:.1f}" '
                   f'fill="#4c78a8"><title>{esc(tip)}</title></rect>')
        yc = top + ph - b["confidence"] * ph
        out.append(f'<line x1="{x + 1:.1f}" x2="{x + w - 1:.1f}" y1="{yc:.1f}" y2="{yc:.1f}" stroke="#e45756" '
                   f'stroke-width="2"/>')
    out.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top}" stroke="#888" stroke-dasharray="4 3"/>')
    for v in (0, 0.5, 1):
        out.append(f'<text x="{left - 4}" y="{top + ph - v * ph + 3:.1f}" font-size="9" text-anchor="end">{v}</text>'
                   f'<text x="{left + v * pw:.1f}" y="{top + ph + 12}" font-size="9" text-anchor="middle">{v}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 6}" font-size="10" text-anchor="middle">confidence '
               f'(red: mean per bin)</text><text x="10" y="{top + ph / 2}" font-size="10" text-anchor="middle" '
               f'transform="rotate(-90 10 {top + ph / 2})">accuracy</text></svg>')
    return "".join(out)

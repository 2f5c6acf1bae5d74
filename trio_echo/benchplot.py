"""``trio-echo bench --plot FILE.svg``: the latency percentile distribution as an SVG (pure).

The plot HdrHistogram's own plotter draws: latency against percentile, the percentile axis in
"nines" (x = 1 / (1 - p), log scale), so the tail gets room: 90 %, 99 %, 99.9 % ... are evenly spaced.
A few lines of SVG rather than a plotting library: one line chart does not justify matplotlib's
weight, and the file has no script, font or network dependency.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape

WIDTH, HEIGHT = 720, 420
LEFT, RIGHT, TOP, BOTTOM = 70, 45, 40, 50
NINES = 6  # up to 99.9999 %


def percentile_points(
    value_at: Callable[[float], float], *, steps_per_nine: int = 20
) -> list[tuple[float, float]]:
    """``(percentile, latency_us)`` from 0 % to 99.9999 %, evenly spaced in nines."""
    points = []
    for step in range(NINES * steps_per_nine + 1):
        nines = step / steps_per_nine
        percentile = 100.0 * (1.0 - 10.0**-nines)
        points.append((percentile, float(value_at(percentile))))
    return points


def _nines(percentile: float) -> float:
    return -math.log10(max(1e-12, 1.0 - percentile / 100.0))


def percentile_svg(points: Sequence[tuple[float, float]], *, title: str) -> str:
    """The SVG document: latency (ms, linear) against percentile (nines, log)."""
    top_value = max((value for _, value in points), default=0.0) / 1000.0
    y_max = _nice(top_value)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(percentile: float) -> float:
        return LEFT + plot_w * min(_nines(percentile), NINES) / NINES

    def y(value_ms: float) -> float:
        return TOP + plot_h * (1.0 - value_ms / y_max)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>',
    ]
    for nine in range(NINES + 1):
        label = "0%" if nine == 0 else f"{100 * (1 - 10**-nine):.{max(0, nine - 2)}f}%"
        gx = LEFT + plot_w * nine / NINES
        parts.append(f'<line x1="{gx:.1f}" y1="{TOP}" x2="{gx:.1f}" y2="{TOP + plot_h}" stroke="#ddd"/>')
        parts.append(f'<text x="{gx:.1f}" y="{TOP + plot_h + 18}" text-anchor="middle">{label}</text>')
    for tick in range(5):
        value = y_max * tick / 4
        gy = y(value)
        parts.append(f'<line x1="{LEFT}" y1="{gy:.1f}" x2="{LEFT + plot_w}" y2="{gy:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{LEFT - 8}" y="{gy + 4:.1f}" text-anchor="end">{value:g}</text>')
    parts.append(
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 10}" text-anchor="middle">percentile</text>'
        f'<text x="18" y="{TOP + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 18 {TOP + plot_h / 2})">latency (ms)</text>'
    )
    path = " ".join(f"{x(p):.1f},{y(v / 1000.0):.1f}" for p, v in points)
    parts.append(f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{path}"/>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _nice(value: float) -> float:
    """A round axis maximum at or above ``value`` (1, 2 or 5 times a power of ten)."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 5, 10) if step * power >= value)

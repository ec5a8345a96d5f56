"""The feature-count chart of a source's page: SVG drawn on the server (no script, no library).

One line per layer entry through its successful runs over time, a dot at each; a regression (a
success the dequeuer gave a regression warning: its counts fell against the entry's last good
run, ``services/dequeuer/regressions.py``) is a red ring, a failure a red cross on the time
axis; both link to their run and say what they are on hover. Everything written into the SVG
that came from a source (entry names) is escaped.

A source has a run a week in each of its entries, so a chart holds hundreds of points: the
dots are SVG markers on the line's vertices (one ``<polyline>`` per entry, however many runs),
so that drawing costs a number pair per run rather than an element; only the marked runs get
elements and links of their own.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import NamedTuple

from markupsafe import Markup, escape

from services.webhook.views.format import thousands

WIDTH, HEIGHT = 720, 240
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 12, 12, 28
#: Line colours of the entries, in turn (readable on white, distinct from the red of trouble).
COLOURS = ("#1f6feb", "#8250df", "#1a7f37", "#bc4c00", "#0a7ea4", "#6e7781")
_RED = "#cf222e"


class Point(NamedTuple):
    """One finished run: ``at_s`` its finish in seconds since the epoch."""

    run_id: int
    at_s: float
    status: str
    features: int | None
    regression: bool = False

    @property
    def at(self) -> datetime:
        return datetime.fromtimestamp(self.at_s, UTC)


class Series(NamedTuple):
    """One entry's runs, oldest first."""

    label: str
    points: list[Point]


def draw(series: list[Series]) -> Markup | None:
    """The chart, or None when there is nothing to draw."""
    points = [point for line in series for point in line.points]
    if not points:
        return None
    start = min(point.at_s for point in points)
    end = max(point.at_s for point in points)
    top = max((point.features or 0 for point in points), default=0) or 1
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
    x_scale, y_scale = plot_w / max(end - start, 1.0), plot_h / top
    base = _TOP + plot_h

    def x(point: Point) -> float:
        return round(_LEFT + (point.at_s - start) * x_scale, 1)

    def y(point: Point) -> float:
        return round(base - (point.features or 0) * y_scale, 1)

    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="Features per run over time" xmlns="http://www.w3.org/2000/svg"><defs>',
        *(f'<marker id="dot-{index}" viewBox="0 0 6 6" refX="3" refY="3" markerWidth="6" '
          f'markerHeight="6" markerUnits="userSpaceOnUse"><circle cx="3" cy="3" r="3" '
          f'fill="{COLOURS[index % len(COLOURS)]}"/></marker>'
          for index in range(len(series))),
        '</defs>',
        f'<line class="axis" x1="{_LEFT}" y1="{base}" x2="{WIDTH - _RIGHT}" y2="{base}"/>',
        f'<line class="axis" x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{base}"/>',
        f'<text class="tick" x="{_LEFT - 6}" y="{_TOP + 10}" text-anchor="end">'
        f'{thousands(top)}</text>',
        f'<text class="tick" x="{_LEFT - 6}" y="{base}" text-anchor="end">0</text>',
        f'<text class="tick" x="{_LEFT}" y="{HEIGHT - 8}">'
        f'{datetime.fromtimestamp(start, UTC):%Y-%m-%d}</text>',
        f'<text class="tick" x="{WIDTH - _RIGHT}" y="{HEIGHT - 8}" text-anchor="end">'
        f'{datetime.fromtimestamp(end, UTC):%Y-%m-%d}</text>',
    ]
    for index, line in enumerate(series):
        label = escape(line.label)  # once per line: the points add only numbers and dates
        good = [p for p in line.points if p.status == "success" and p.features is not None]
        if good:
            dot = f"url(#dot-{index})"
            coordinates = " ".join([  # x(p),y(p) written out: hundreds of points
                f"{_LEFT + (p.at_s - start) * x_scale:.1f},"
                f"{base - (p.features or 0) * y_scale:.1f}" for p in good])
            parts.append(
                f'<polyline fill="none" stroke="{COLOURS[index % len(COLOURS)]}" '
                f'stroke-width="2" marker-start="{dot}" marker-mid="{dot}" marker-end="{dot}" '
                f'points="{coordinates}"><title>{label}: {len(good)} good runs, '
                f'{thousands(good[-1].features)} features in the latest</title></polyline>')
        for point in line.points:
            if point.regression:
                cx, cy = x(point), y(point)
                shape = (f'<circle cx="{cx}" cy="{cy}" r="6" fill="none" stroke="{_RED}" '
                         f'stroke-width="2"/>')
            elif point.status == "failure":
                cx = x(point)
                shape = (f'<path d="M{cx - 4},{base - 4} l8,8 m0,-8 l-8,8" stroke="{_RED}" '
                         f'stroke-width="2"/>')
            else:
                continue
            count = thousands(point.features) if point.features is not None else "no"
            mark = ", regression" if point.regression else ""
            parts.append(f'<a href="/runs/{point.run_id}"><title>{label}: run {point.run_id}, '
                         f'{point.at:%Y-%m-%d}, {point.status}, {count} features{mark}</title>'
                         f'{shape}</a>')
    parts.append("</svg>")
    return Markup("".join(parts))


def legend(series: list[Series]) -> list[tuple[str, str]]:
    """(colour, entry label) per line, for the page to list under the chart."""
    return [(COLOURS[index % len(COLOURS)], line.label) for index, line in enumerate(series)]

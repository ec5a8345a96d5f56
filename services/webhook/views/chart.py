"""The feature-count chart of a source's page: SVG drawn on the server (no script, no library).

One line per layer entry through its successful runs over time; a regression (a success with
:data:`REGRESSION_DROP` fewer features or more than the entry's previous success) is a red
ring, a failure a red cross on the time axis. Every point links to its run. Everything written
into the SVG that came from a source (entry names) is escaped.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from markupsafe import Markup, escape

from services.webhook.views.format import thousands

#: A success this much below the entry's previous success is a regression.
REGRESSION_DROP = 0.10
WIDTH, HEIGHT = 720, 240
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 12, 12, 28
#: Line colours of the entries, in turn (readable on white, distinct from the red of trouble).
COLOURS = ("#1f6feb", "#8250df", "#1a7f37", "#bc4c00", "#0a7ea4", "#6e7781")


@dataclass(frozen=True)
class Point:
    run_id: int
    at: datetime
    status: str
    features: int | None
    regression: bool = False


@dataclass(frozen=True)
class Series:
    """One entry's runs, oldest first."""

    label: str
    points: list[Point]


def mark_regressions(points: list[Point]) -> list[Point]:
    """``points`` (oldest first) with each success that fell by REGRESSION_DROP or more from
    the previous success marked."""
    marked: list[Point] = []
    previous: int | None = None
    for point in points:
        regression = False
        if point.status == "success" and point.features is not None:
            if previous and point.features <= previous * (1 - REGRESSION_DROP):
                regression = True
            previous = point.features
        marked.append(Point(point.run_id, point.at, point.status, point.features, regression))
    return marked


def draw(series: list[Series]) -> Markup | None:
    """The chart, or None when there is nothing to draw."""
    points = [point for line in series for point in line.points]
    if not points:
        return None
    start = min(point.at for point in points).timestamp()
    end = max(point.at for point in points).timestamp()
    span = max(end - start, 1.0)
    top = max((point.features or 0 for point in points), default=0) or 1
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM

    def x(at: datetime) -> float:
        return round(_LEFT + (at.timestamp() - start) / span * plot_w, 1)

    def y(features: int) -> float:
        return round(_TOP + plot_h - features / top * plot_h, 1)

    base = _TOP + plot_h
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="Features per run over time" xmlns="http://www.w3.org/2000/svg">',
        f'<line class="axis" x1="{_LEFT}" y1="{base}" x2="{WIDTH - _RIGHT}" y2="{base}"/>',
        f'<line class="axis" x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{base}"/>',
        f'<text class="tick" x="{_LEFT - 6}" y="{_TOP + 10}" text-anchor="end">'
        f'{thousands(top)}</text>',
        f'<text class="tick" x="{_LEFT - 6}" y="{base}" text-anchor="end">0</text>',
        f'<text class="tick" x="{_LEFT}" y="{HEIGHT - 8}">'
        f'{min(p.at for p in points):%Y-%m-%d}</text>',
        f'<text class="tick" x="{WIDTH - _RIGHT}" y="{HEIGHT - 8}" text-anchor="end">'
        f'{max(p.at for p in points):%Y-%m-%d}</text>',
    ]
    for index, line in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        label = escape(line.label)  # once per line: the points only add numbers and dates
        good = [p for p in line.points if p.status == "success" and p.features is not None]
        if len(good) > 1:
            path = " ".join(f"{x(p.at)},{y(p.features or 0)}" for p in good)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
                         f'points="{path}"/>')
        for point in line.points:
            day = point.at.isoformat()[:10]
            count = f"{point.features:,}" if point.features is not None else "no"
            mark = ", regression" if point.regression else ""
            parts.append(f'<a href="/runs/{point.run_id}"><title>{label}: run {point.run_id}, '
                         f'{day}, {point.status}, {count} features{mark}</title>')
            cx = x(point.at)
            if point.status == "success" and point.features is not None:
                cy = y(point.features)
                if point.regression:
                    parts.append(f'<circle cx="{cx}" cy="{cy}" r="6" fill="none" '
                                 f'stroke="#cf222e" stroke-width="2"/>')
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="3" fill="{colour}"/>')
            elif point.status == "failure":
                parts.append(f'<path d="M{cx - 4},{base - 4} l8,8 m0,-8 l-8,8" '
                             f'stroke="#cf222e" stroke-width="2"/>')
            parts.append("</a>")
    parts.append("</svg>")
    return Markup("".join(parts))


def legend(series: list[Series]) -> list[tuple[str, str]]:
    """(colour, entry label) per line, for the page to list under the chart."""
    return [(COLOURS[index % len(COLOURS)], line.label) for index, line in enumerate(series)]

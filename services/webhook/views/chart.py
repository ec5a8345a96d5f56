"""The feature-count chart of a source's page: SVG drawn on the server (no script, no library).

One line per layer entry through its successful runs over time, a dot at each; a regression (a
success the dequeuer gave a regression warning: its counts fell against the entry's last good
run, ``services/dequeuer/regressions.py``) is a red ring, a failure a red cross on the time
axis; both link to their run and say what they are on hover. Everything written into the SVG
that came from a source (entry names) is escaped.

A source has a run a week in each of its entries, so a chart holds hundreds of points: the
dots are SVG markers on the line's vertices (one ``<polyline>`` per entry, however many runs),
so that drawing costs a number pair per run rather than an element; only the marked runs get
elements and links of their own. ``sources.py`` reads the runs and places them
(:func:`place`, :func:`place_all`); :func:`draw` only writes the numbers out.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import NamedTuple

from markupsafe import Markup, escape

from services.webhook.views.format import thousands

WIDTH, HEIGHT = 720, 240
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 12, 12, 28
_PLOT_W, _PLOT_H = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
_BASE = _TOP + _PLOT_H
#: Line colours of the entries, in turn (readable on white, distinct from the red of trouble).
COLOURS = ("#1f6feb", "#8250df", "#1a7f37", "#bc4c00", "#0a7ea4", "#6e7781")
_RED = "#cf222e"


class Point(NamedTuple):
    """A marked run (a regression or a failure): ``at_s`` its finish in seconds since the
    epoch, ``x`` and ``y`` where it is drawn."""

    run_id: int
    at_s: float
    status: str
    features: int | None
    regression: bool
    x: float
    y: float

    @property
    def at(self) -> datetime:
        return datetime.fromtimestamp(self.at_s, UTC)


class Series(NamedTuple):
    """One entry's line: the (x, y) of its good runs (successes with a feature count),
    oldest first; the latest one's feature count; its marked runs, oldest first."""

    label: str
    points: list[tuple[float, float]]
    latest_features: int | None
    marked: list[Point]


class Chart(NamedTuple):
    """The lines, and the span they are drawn over: the first and last finish (seconds since
    the epoch) and the largest feature count (at least 1)."""

    start_s: float
    end_s: float
    top: int
    series: list[Series]


def place(at_s: float, features: int | None, start_s: float, end_s: float,
          top: int) -> tuple[float, float]:
    """Where a run is drawn: x from its finish, y from its feature count."""
    x_scale, y_scale = _PLOT_W / max(end_s - start_s, 1.0), _PLOT_H / top
    return _LEFT + (at_s - start_s) * x_scale, _BASE - (features or 0) * y_scale


def place_all(runs: list[tuple[float, int | None]], start_s: float, end_s: float,
              top: int) -> list[tuple[float, float]]:
    """:func:`place` of each (finish, features) of ``runs``."""
    x_scale, y_scale = _PLOT_W / max(end_s - start_s, 1.0), _PLOT_H / top
    return [(_LEFT + (at_s - start_s) * x_scale, _BASE - (features or 0) * y_scale)
            for at_s, features in runs]


def draw(chart: Chart | None) -> Markup | None:
    """The chart, or None when there is nothing to draw."""
    if chart is None or not chart.series:
        return None
    series = chart.series
    base = _BASE
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
        f'{thousands(chart.top)}</text>',
        f'<text class="tick" x="{_LEFT - 6}" y="{base}" text-anchor="end">0</text>',
        f'<text class="tick" x="{_LEFT}" y="{HEIGHT - 8}">'
        f'{datetime.fromtimestamp(chart.start_s, UTC):%Y-%m-%d}</text>',
        f'<text class="tick" x="{WIDTH - _RIGHT}" y="{HEIGHT - 8}" text-anchor="end">'
        f'{datetime.fromtimestamp(chart.end_s, UTC):%Y-%m-%d}</text>',
    ]
    for index, line in enumerate(series):
        label = escape(line.label)  # once per line: the points add only numbers and dates
        if line.points:
            dot = f"url(#dot-{index})"
            # %-formatting: half the cost of f"{x:.1f},{y:.1f}" (the same text).
            coordinates = " ".join(["%.1f,%.1f" % point for point in line.points])  # noqa: UP031
            parts.append(
                f'<polyline fill="none" stroke="{COLOURS[index % len(COLOURS)]}" '
                f'stroke-width="2" marker-start="{dot}" marker-mid="{dot}" marker-end="{dot}" '
                f'points="{coordinates}"><title>{label}: {len(line.points)} good runs, '
                f'{thousands(line.latest_features)} features in the latest</title></polyline>')
        for point in line.marked:
            cx = round(point.x, 1)
            if point.regression:
                shape = (f'<circle cx="{cx}" cy="{round(point.y, 1)}" r="6" fill="none" '
                         f'stroke="{_RED}" stroke-width="2"/>')
            else:  # a failure
                shape = (f'<path d="M{cx - 4},{base - 4} l8,8 m0,-8 l-8,8" stroke="{_RED}" '
                         f'stroke-width="2"/>')
            count = thousands(point.features) if point.features is not None else "no"
            mark = ", regression" if point.regression else ""
            parts.append(f'<a href="/runs/{point.run_id}"><title>{label}: run {point.run_id}, '
                         f'{point.at:%Y-%m-%d}, {point.status}, {count} features{mark}</title>'
                         f'{shape}</a>')
    parts.append("</svg>")
    return Markup("".join(parts))


def legend(chart: Chart | None) -> list[tuple[str, str]]:
    """(colour, entry label) per line, for the page to list under the chart."""
    if chart is None:
        return []
    return [(COLOURS[index % len(COLOURS)], line.label)
            for index, line in enumerate(chart.series)]

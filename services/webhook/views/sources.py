"""Sources: ``/sources/`` (every current source and its entries' latest runs) and
``/sources/{name}`` (every run of each entry over time, the feature-count chart with
regressions marked, the latest good outputs)."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from aiohttp import web

from services.webhook.keys import POOL
from services.webhook.views import chart
from services.webhook.views.models import (
    Entry,
    Run,
    Source,
    SourceDetail,
    SourceList,
    SourceRunsQuery,
    SourcesQuery,
    source_name,
    source_url,
)
from services.webhook.views.params import next_link, parse
from services.webhook.views.render import page
from services.webhook.views.sql import NO_CURSOR, RUN_COLUMNS, query

_ENTRY_COLUMNS = """e.source_path, e.layer, e.entry_name, e.run_id, e.finished_at, e.status,
       e.good_run_id, e.good_finished_at, e.features, e.addresses, g.outputs AS good_outputs"""

# A page of current sources: their names from the entries' primary key, then their entries.
SOURCE_LIST = query("sources.list", f"""
    WITH paths AS (
        SELECT DISTINCT source_path FROM entries
        WHERE source_path > $1 AND finished_at >= (SELECT site_current_since())
        ORDER BY source_path LIMIT $2
    )
    SELECT {_ENTRY_COLUMNS}
    FROM paths p JOIN entries e ON e.source_path = p.source_path
    LEFT JOIN runs g ON g.id = e.good_run_id
    WHERE e.finished_at >= (SELECT site_current_since())
    ORDER BY e.source_path, e.layer, e.entry_name
""", "after_path", "limit")
SOURCE_ENTRIES = query("sources.entries", f"""
    SELECT {_ENTRY_COLUMNS}
    FROM entries e LEFT JOIN runs g ON g.id = e.good_run_id
    WHERE e.source_path = $1 ORDER BY e.layer, e.entry_name
""", "source_path")
SOURCE_RUNS = query("sources.runs", f"""
    SELECT {RUN_COLUMNS} FROM runs r
    WHERE r.source_path = $1 AND r.id < $2 ORDER BY r.id DESC LIMIT $3
""", "source_path", "before", "limit")
#: The chart's points: the published runs (a pull request's are not the source's history),
#: from the index on (source_path, id) alone (migration 0007: it includes these columns).
#: site_published() runs a query and PostgreSQL cannot inline it: asked only of job runs.
SOURCE_CHART = query("sources.chart", """
    SELECT r.id, r.layer, r.entry_name, r.status,
           extract(epoch FROM r.finished_at)::float8 AS at_s, r.features,
           r.warning IS NOT NULL AS warned
    FROM runs r
    WHERE r.source_path = $1 AND r.status IS NOT NULL AND r.finished_at IS NOT NULL
      AND (r.set_id IS NOT NULL OR site_published(r.set_id, r.job_id))
    ORDER BY r.id DESC LIMIT 1000
""", "source_path")

#: Runs listed on a source's page (the API lists SourceRunsQuery's default).
PAGE_RUNS = 20
#: Regressions listed under the chart, newest first (the chart marks every one).
REGRESSIONS_LISTED = 10
#: The files /latest/run/ serves, by the extension asked for.
LATEST_FILES = {"zip": "processed.zip", "csv": "out.csv", "geojson": "out.geojson"}


def path_of(name: str) -> str:
    """``us/ca/alameda`` → ``sources/us/ca/alameda.json``."""
    return f"sources/{name}.json"


def latest_url(name: str, layer: str, entry: str, extension: str) -> str:
    return f"/latest/run/{quote(name)}/{quote(layer)}/{quote(entry, safe='')}.{extension}"


def entry_of(row: Any) -> Entry:
    name = source_name(row["source_path"])
    outputs = row["good_outputs"] or {}
    downloads = {
        extension: latest_url(name, row["layer"], row["entry_name"], extension)
        for extension, file in LATEST_FILES.items() if name and file in outputs
    }
    return Entry(
        source_path=row["source_path"], source=name, layer=row["layer"],
        entry_name=row["entry_name"], latest_run_id=row["run_id"],
        latest_status=row["status"], latest_finished_at=row["finished_at"],
        good_run_id=row["good_run_id"], good_finished_at=row["good_finished_at"],
        features=row["features"], addresses=row["addresses"], downloads=downloads,
    )


def _sources(rows: list[Any]) -> list[Source]:
    grouped: dict[str, list[Entry]] = defaultdict(list)
    for row in rows:
        grouped[row["source_path"]].append(entry_of(row))
    return [Source(source_path=path, source=source_name(path), url=source_url(path),
                   entries=entries) for path, entries in grouped.items()]


async def list_sources(app: web.Application, given: SourcesQuery, path: str) -> SourceList:
    after = path_of(given.after) if given.after else ""
    rows = await SOURCE_LIST.fetch(app[POOL], after, given.limit)
    items = _sources(rows)
    more = len(items) == given.limit
    return SourceList(items=items, next=next_link(path, given, after=items[-1].source or "")
                      if more and items else None)


async def source_detail(
    app: web.Application, name: str, given: SourceRunsQuery, path: str
) -> SourceDetail:
    pool = app[POOL]
    source_path = path_of(name)
    entries = [entry_of(row) for row in await SOURCE_ENTRIES.fetch(pool, source_path)]
    rows = await SOURCE_RUNS.fetch(pool, source_path, given.before or NO_CURSOR, given.limit)
    if not rows and not entries and given.before is None:
        raise web.HTTPNotFound(text=f"There is no source {name}: no run has read "
                                    f"{source_path}.")
    now = datetime.now(UTC)
    runs = [Run.of(row, now) for row in rows]
    more = len(rows) == given.limit
    source = Source(source_path=source_path, source=name, url=source_url(source_path),
                    entries=entries)
    return SourceDetail(source=source, runs=runs,
                        next=next_link(path, given, before=runs[-1].id) if more else None)


async def chart_series(app: web.Application, source_path: str) -> list[chart.Series]:
    """One series per entry, oldest run first, regressions marked: the runs the dequeuer
    gave a regression warning (services/dequeuer/regressions.py, the one rule)."""
    rows = await SOURCE_CHART.fetch(app[POOL], source_path)
    points: dict[str, list[chart.Point]] = defaultdict(list)
    point = chart.Point
    # By position, not name: hundreds of rows (the columns of SOURCE_CHART, in order).
    for run_id, layer, entry_name, status, at_s, features, warned in rows:
        points[f"{layer}/{entry_name}"].append(point(run_id, at_s, status, features, warned))
    return [chart.Series(label, sorted(line, key=_moment))
            for label, line in sorted(points.items())]


def _moment(point: chart.Point) -> tuple[float, int]:
    return point.at_s, point.run_id


async def sources_page(request: web.Request) -> web.Response:
    given = parse(request, SourcesQuery)
    sources = await list_sources(request.app, given, "/sources/")
    return page(request, "sources.html", title="Sources", sources=sources)


async def source_page(request: web.Request) -> web.Response:
    name = request.match_info["name"].strip("/")
    given = parse(request, SourceRunsQuery)
    if "limit" not in request.query:
        # The page's history is its chart; its table, the latest runs in detail, pages.
        given = given.model_copy(update={"limit": PAGE_RUNS})
    detail = await source_detail(request.app, name, given, f"/sources/{quote(name)}")
    series = await chart_series(request.app, detail.source.source_path)
    regressions = sorted(((line.label, point) for line in series for point in line.points
                          if point.regression), key=lambda found: -found[1].at_s)
    return page(request, "source.html", title=name, name=name, detail=detail,
                chart=chart.draw(series), legend=chart.legend(series),
                regressions=regressions[:REGRESSIONS_LISTED],
                regressions_more=len(regressions) - REGRESSIONS_LISTED)

"""Sources: ``/sources/`` (every current source and its entries' latest runs) and
``/sources/{name}`` (every run of each entry over time, the feature-count chart with
regressions marked, the latest good outputs)."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from operator import itemgetter
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
from services.webhook.views.params import next_link, parse, path_text
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
    source_path = path_of(path_text(name, "There is no source by that name."))
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


#: SOURCE_CHART's columns, by position: hundreds of rows, read without names.
_ID, _LAYER, _ENTRY, _STATUS, _AT, _FEATURES, _WARNED = range(7)
_MOMENT = itemgetter(_AT, _ID)
_ENTRY_OF = itemgetter(_LAYER, _ENTRY)


async def chart_of(app: web.Application, source_path: str) -> chart.Chart | None:
    """One series per entry (by label), oldest run first, regressions marked: the runs the
    dequeuer gave a regression warning (services/dequeuer/regressions.py, the one rule).
    None: no run to draw. Per run only what the chart needs: a good run is a number pair, a
    marked one (a regression or a failure) a :class:`chart.Point`."""
    rows = await SOURCE_CHART.fetch(app[POOL], source_path)
    if not rows:
        return None
    start_s = min(map(itemgetter(_AT), rows))
    end_s = max(map(itemgetter(_AT), rows))
    top = max([row[_FEATURES] or 0 for row in rows]) or 1
    by_entry: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for row in rows:
        by_entry[_ENTRY_OF(row)].append(row)
    lines: dict[str, list[Any]] = {}
    for (layer, entry_name), line in by_entry.items():
        lines.setdefault(f"{layer}/{entry_name}", []).extend(line)
    series = []
    for label, line in sorted(lines.items()):
        line.sort(key=_MOMENT)
        good = [(row[_AT], row[_FEATURES]) for row in line
                if row[_STATUS] == "success" and row[_FEATURES] is not None]
        marked = [chart.Point(row[_ID], row[_AT], row[_STATUS], row[_FEATURES], row[_WARNED],
                              *chart.place(row[_AT], row[_FEATURES], start_s, end_s, top))
                  for row in line if row[_WARNED] or row[_STATUS] == "failure"]
        series.append(chart.Series(label, chart.place_all(good, start_s, end_s, top),
                                   good[-1][1] if good else None, marked))
    return chart.Chart(start_s, end_s, top, series)


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
    drawn = await chart_of(request.app, detail.source.source_path)
    regressions = sorted(((line.label, point) for line in (drawn.series if drawn else ())
                          for point in line.marked if point.regression),
                         key=lambda found: -found[1].at_s)
    return page(request, "source.html", title=name, name=name, detail=detail,
                chart=chart.draw(drawn), legend=chart.legend(drawn),
                regressions=regressions[:REGRESSIONS_LISTED],
                regressions_more=len(regressions) - REGRESSIONS_LISTED)

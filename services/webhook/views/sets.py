"""Sets: ``/sets/`` (newest first, each with its progress) and ``/sets/{id}`` (a progress bar,
counts by state and by problem, the runs failures first, filtered by state and problem)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from services.webhook.keys import POOL, SITE_CACHE
from services.webhook.views.models import (
    RANK_OF_STATE,
    Run,
    Set,
    SetDetail,
    SetList,
    SetRunsQuery,
    SetsQuery,
    Tally,
)
from services.webhook.views.params import integer_id, next_link, parse
from services.webhook.views.render import page
from services.webhook.views.sql import NO_CURSOR, RUN_COLUMNS, Filter, pick, query, variants
from services.webhook.views.tallies import set_problems, set_tallies

_SET_COLUMNS = "id, kind, created_at, finished_at, status, counts"

SET_LIST = query("sets.list", f"""
    SELECT {_SET_COLUMNS} FROM sets WHERE id < $1 ORDER BY id DESC LIMIT $2
""", "before", "limit")
SET_ONE = query("sets.one", f"SELECT {_SET_COLUMNS} FROM sets WHERE id = $1", "set_id")
SET_LATEST = query("sets.latest", f"SELECT {_SET_COLUMNS} FROM sets ORDER BY id DESC LIMIT 1")
SET_NEWEST_FINISHED = query("sets.newest_finished", """
    SELECT id FROM sets WHERE finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT 1
""")
# Failures first (migration 0007's site_run_rank), walked from a (rank, id) cursor on the
# index of (set_id, rank, id).
SET_RUNS = variants("sets.runs", f"""
    SELECT {RUN_COLUMNS}, site_run_rank(r.status, r.started_at) AS rank
    FROM runs r
    WHERE r.set_id = $1 AND (site_run_rank(r.status, r.started_at), r.id) > ($2, $3){{where}}
    ORDER BY site_run_rank(r.status, r.started_at), r.id
    LIMIT $4
""", {
    "rank": Filter("site_run_rank(r.status, r.started_at) = {}", "rank"),
    "problem": Filter("r.source_problem = {}", "problem"),
}, "set_id", "after_rank", "after_id", "limit")


def set_of(row: Any, tally: Tally) -> Set:
    return Set(id=row["id"], url=f"/sets/{row['id']}", kind=row["kind"],
               created_at=row["created_at"], finished_at=row["finished_at"],
               status=row["status"], runs=tally)


async def list_sets(app: web.Application, given: SetsQuery, path: str) -> SetList:
    pool = app[POOL]
    rows = await SET_LIST.fetch(pool, given.before or NO_CURSOR, given.limit)
    tallies = await set_tallies(pool, app[SITE_CACHE], rows)
    items = [set_of(row, tallies[row["id"]]) for row in rows]
    more = len(rows) == given.limit
    return SetList(items=items,
                   next=next_link(path, given, before=items[-1].id) if more else None)


async def latest_set(app: web.Application) -> Set | None:
    pool = app[POOL]
    row = await SET_LATEST.fetchrow(pool)
    if row is None:
        return None
    tallies = await set_tallies(pool, app[SITE_CACHE], [row])
    return set_of(row, tallies[row["id"]])


async def set_detail(
    app: web.Application, set_id: int, given: SetRunsQuery, path: str
) -> SetDetail:
    pool = app[POOL]
    row = await SET_ONE.fetchrow(pool, set_id)
    if row is None:
        raise web.HTTPNotFound(text=f"There is no set {set_id}.")
    tallies = await set_tallies(pool, app[SITE_CACHE], [row])
    after_rank, after_id = -1, 0
    if given.after:
        rank_text, id_text = given.after.split(".")
        after_rank, after_id = int(rank_text), min(int(id_text), NO_CURSOR)
    chosen, values = pick(SET_RUNS, {
        "rank": RANK_OF_STATE[given.state] if given.state else None,
        "problem": given.problem,
    })
    rows = await chosen.fetch(pool, set_id, after_rank, after_id, given.limit, *values)
    now = datetime.now(UTC)
    runs = [Run.of(run, now) for run in rows]
    more = len(rows) == given.limit
    cursor = f"{rows[-1]['rank']}.{rows[-1]['id']}" if rows else ""
    problems = await set_problems(pool, app[SITE_CACHE], row, tallies[set_id])
    return SetDetail(set=set_of(row, tallies[set_id]), problems=problems, runs=runs,
                     next=next_link(path, given, after=cursor) if more else None)


async def sets_page(request: web.Request) -> web.Response:
    given = parse(request, SetsQuery)
    sets = await list_sets(request.app, given, "/sets/")
    return page(request, "sets.html", title="Sets", sets=sets)


async def set_page(request: web.Request) -> web.Response:
    set_id = integer_id(request, "set_id")
    given = parse(request, SetRunsQuery)
    detail = await set_detail(request.app, set_id, given, f"/sets/{set_id}")
    refresh = {"Refresh": "30"} if detail.set.finished_at is None else None
    return page(request, "set.html", title=f"Set {set_id}", detail=detail, given=given,
                states=list(RANK_OF_STATE), headers=refresh)


async def newest_finished_set(request: web.Request) -> web.Response:
    """``/latest/set``: to the newest finished set's page."""
    set_id = await SET_NEWEST_FINISHED.fetchval(request.app[POOL])
    if set_id is None:
        raise web.HTTPNotFound(text="No set has finished yet.")
    raise web.HTTPFound(f"/sets/{set_id}")

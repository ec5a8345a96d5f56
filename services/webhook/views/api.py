"""The JSON API under ``/api/``: every endpoint declared once (:data:`ENDPOINTS`), from which
both its route and its part of the OpenAPI document (``openapi.py``) are made.

Lists page by keyset: each answer's ``next`` is the address of the following page (null on
the last), carrying the same filters. Errors are ``{"error": "..."}`` with 400 (a bad
parameter, named) or 404.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

import pydantic
from aiohttp import web

from services.webhook.keys import POOL
from services.webhook.views import home, jobs, runs, schedule, sets, sources, workers
from services.webhook.views.models import (
    Home,
    JobDetail,
    JobList,
    JobsQuery,
    Run,
    RunDetail,
    RunList,
    RunsQuery,
    Schedule,
    SetDetail,
    SetList,
    SetRunsQuery,
    SetsQuery,
    SourceDetail,
    SourceList,
    SourceRunsQuery,
    SourcesQuery,
    Workers,
    WorkersQuery,
)
from services.webhook.views.params import integer_id, next_link, parse
from services.webhook.views.sql import NO_CURSOR, RUN_COLUMNS, Filter, pick, variants

RUN_LIST = variants("api.runs", f"""
    SELECT {RUN_COLUMNS} FROM runs r WHERE r.id < $1{{where}} ORDER BY r.id DESC LIMIT $2
""", {
    "status": Filter("r.status = {}", "run_status"), "open": Filter("r.status IS NULL"),
    "job": Filter("r.job_id = {}", "job_id"), "set": Filter("r.set_id = {}", "set_id"),
    "source": Filter("r.source_path = {}", "source_path"),
}, "before", "limit", exclusive=[frozenset({"status", "open"}),
                                  frozenset({"job", "set", "source"})])

Answer = Callable[[web.Request], Awaitable[pydantic.BaseModel]]


@dataclass(frozen=True)
class Endpoint:
    """One ``GET`` of the API: its route (aiohttp's pattern), what it answers, the query
    string it reads, and what it is for."""

    route: str
    name: str
    summary: str
    answer: type[pydantic.BaseModel]
    handler: Answer
    query: type[pydantic.BaseModel] | None = None
    #: The route has an id or a name that may not exist.
    may_be_missing: bool = False


async def _summary(request: web.Request) -> Home:
    return (await home.home(request.app)).figures


async def _jobs(request: web.Request) -> JobList:
    return await jobs.list_jobs(request.app, parse(request, JobsQuery), "/api/jobs")


async def _job(request: web.Request) -> JobDetail:
    return await jobs.job_detail(request.app, integer_id(request, "job_id"))


async def _runs(request: web.Request) -> RunList:
    given = parse(request, RunsQuery)
    if sum(value is not None for value in (given.job, given.set, given.source)) > 1:
        raise web.HTTPBadRequest(text="job, set, source: give one of them at most")
    chosen, values = pick(RUN_LIST, {
        "status": given.status if given.status != "open" else None,
        "open": given.status == "open", "job": given.job, "set": given.set,
        "source": sources.path_of(given.source) if given.source else None,
    })
    rows = await chosen.fetch(request.app[POOL], given.before or NO_CURSOR, given.limit,
                              *values)
    now = datetime.now(UTC)
    items = [Run.of(row, now) for row in rows]
    more = len(rows) == given.limit
    return RunList(items=items,
                   next=next_link("/api/runs", given, before=items[-1].id) if more else None)


async def _run(request: web.Request) -> RunDetail:
    detail, _row = await runs.run_detail(request.app, integer_id(request, "run_id"))
    return detail


async def _sets(request: web.Request) -> SetList:
    return await sets.list_sets(request.app, parse(request, SetsQuery), "/api/sets")


async def _set(request: web.Request) -> SetDetail:
    set_id = integer_id(request, "set_id")
    return await sets.set_detail(request.app, set_id, parse(request, SetRunsQuery),
                                 f"/api/sets/{set_id}")


async def _sources(request: web.Request) -> SourceList:
    return await sources.list_sources(request.app, parse(request, SourcesQuery),
                                      "/api/sources")


async def _source(request: web.Request) -> SourceDetail:
    name = request.match_info["name"].strip("/")
    return await sources.source_detail(request.app, name, parse(request, SourceRunsQuery),
                                       f"/api/sources/{quote(name)}")


async def _workers(request: web.Request) -> Workers:
    return await workers.workers(request.app, parse(request, WorkersQuery), "/api/workers")


async def _schedule(request: web.Request) -> Schedule:
    return await schedule.schedule(request.app)


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("/api/summary", "summary", "The home page's figures", Home, _summary),
    Endpoint("/api/jobs", "jobs", "Jobs, newest first", JobList, _jobs, JobsQuery),
    Endpoint("/api/jobs/{job_id:\\d+}", "job", "A job and its runs", JobDetail, _job,
             may_be_missing=True),
    Endpoint("/api/runs", "runs", "Runs, newest first", RunList, _runs, RunsQuery),
    Endpoint("/api/runs/{run_id:\\d+}", "run", "A run", RunDetail, _run, may_be_missing=True),
    Endpoint("/api/sets", "sets", "Sets, newest first", SetList, _sets, SetsQuery),
    Endpoint("/api/sets/{set_id:\\d+}", "set", "A set, its counts and its runs (failures "
             "first)", SetDetail, _set, SetRunsQuery, may_be_missing=True),
    Endpoint("/api/sources", "sources", "Current sources and their entries' latest runs",
             SourceList, _sources, SourcesQuery),
    Endpoint("/api/sources/{name:.+}", "source", "A source's entries and its runs, newest "
             "first", SourceDetail, _source, SourceRunsQuery, may_be_missing=True),
    Endpoint("/api/workers", "workers", "Workers by name, and queue depths", Workers,
             _workers, WorkersQuery),
    Endpoint("/api/schedule", "schedule", "The scheduler's entries: cron expression (UTC), "
             "last slot and its outcome, next slot", Schedule, _schedule),
)


def view(endpoint: Endpoint) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The aiohttp handler of ``endpoint``: its answer as JSON."""

    async def handle(request: web.Request) -> web.Response:
        answer = await endpoint.handler(request)
        return web.Response(body=answer.model_dump_json().encode(),
                            content_type="application/json")

    handle.__name__ = f"api_{endpoint.name}"
    return handle

"""Jobs: ``/jobs/`` (newest first, by state, repository and pull request) and ``/jobs/{id}``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from services.webhook.keys import POOL, SETTINGS
from services.webhook.views import github
from services.webhook.views.models import Job, JobDetail, JobList, JobsQuery, Run, Tally
from services.webhook.views.params import integer_id, next_link, parse
from services.webhook.views.render import page
from services.webhook.views.sql import NO_CURSOR, RUN_COLUMNS, Filter, pick, query, variants
from services.webhook.views.tallies import job_tallies

_JOB_COLUMNS = ("id, event, repo, sha, ref, pr_number, head_repo, status, created_at, "
                "finished_at")

JOB_LIST = variants("jobs.list", f"""
    SELECT {_JOB_COLUMNS} FROM jobs WHERE id < $1{{where}} ORDER BY id DESC LIMIT $2
""", {
    "status": Filter("status = {}", "job_status"), "open": Filter("status IS NULL"),
    "repo": Filter("repo = {}", "repo"), "pr": Filter("pr_number = {}", "pr_number"),
}, "before", "limit", exclusive=[frozenset({"status", "open"})])
JOB_ONE = query("jobs.one", f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = $1", "job_id")
JOB_RUNS = query("jobs.runs", f"""
    SELECT {RUN_COLUMNS} FROM runs r WHERE r.job_id = $1 ORDER BY r.id
""", "job_id")


def job_of(row: Any, tally: Tally, base: str | None) -> Job:
    return Job(
        id=row["id"], url=f"/jobs/{row['id']}", event=row["event"], repo=row["repo"],
        sha=row["sha"], ref=row["ref"], pr_number=row["pr_number"], head_repo=row["head_repo"],
        state=row["status"] or "running", status=row["status"], created_at=row["created_at"],
        finished_at=row["finished_at"],
        commit_url=github.commit_url(base, row["head_repo"] or row["repo"], row["sha"]),
        pr_url=github.pull_url(base, row["repo"], row["pr_number"]),
        runs=tally,
    )


async def list_jobs(app: web.Application, given: JobsQuery, path: str) -> JobList:
    if given.pr is not None and given.repo is None:
        raise web.HTTPBadRequest(text="pr: a pull request number needs its repo")
    chosen, values = pick(JOB_LIST, {
        "status": given.state if given.state != "running" else None,
        "open": given.state == "running", "repo": given.repo, "pr": given.pr,
    })
    pool = app[POOL]
    rows = await chosen.fetch(pool, given.before or NO_CURSOR, given.limit, *values)
    tallies = await job_tallies(pool, [row["id"] for row in rows])
    base = github.web_base(app[SETTINGS])
    items = [job_of(row, tallies[row["id"]], base) for row in rows]
    more = len(rows) == given.limit
    return JobList(items=items,
                   next=next_link(path, given, before=items[-1].id) if more else None)


async def job_detail(app: web.Application, job_id: int) -> JobDetail:
    pool = app[POOL]
    row = await JOB_ONE.fetchrow(pool, job_id)
    if row is None:
        raise web.HTTPNotFound(text=f"There is no job {job_id}.")
    now = datetime.now(UTC)
    runs = [Run.of(run, now) for run in await JOB_RUNS.fetch(pool, job_id)]
    tallies = await job_tallies(pool, [job_id])
    job = job_of(row, tallies[job_id], github.web_base(app[SETTINGS]))
    return JobDetail(job=job, runs=runs)


async def jobs_page(request: web.Request) -> web.Response:
    given = parse(request, JobsQuery)
    jobs = await list_jobs(request.app, given, "/jobs/")
    return page(request, "jobs.html", title="Jobs", jobs=jobs, given=given)


async def job_page(request: web.Request) -> web.Response:
    detail = await job_detail(request.app, integer_id(request, "job_id"))
    base = github.web_base(request.app[SETTINGS])
    job = detail.job
    sources = {run.source_path: github.file_url(base, job.head_repo or job.repo, job.sha,
                                                run.source_path) for run in detail.runs}
    # Refreshes itself while runs are in progress: no script needed.
    refresh = {"Refresh": "10"} if job.state == "running" else None
    return page(request, "job.html", title=f"Job {job.id}", job=job, runs=detail.runs,
                summary=job.runs.summary(), source_files=sources, headers=refresh)


"""Turning a push into a job: fetch the changed sources, create the job and its runs, enqueue.

Order matters for the commit status: the job, its runs and the ``pending`` status are written
in one transaction, the status is sent, and only then are tasks published, so a fast worker can
never make ``success`` arrive before ``pending``. A redelivered event finds its job by
``X-GitHub-Delivery`` and only re-publishes runs that were never queued, which also finishes an
intake that died half-way. Runs the broker does not take (it is down) stay unqueued and the
dequeuer's sweep queues them once it is back (:mod:`shared.dispatch`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import asyncpg

from services.webhook.events import PushEvent
from shared.broker import Broker
from shared.config import Settings
from shared.dispatch import dispatch
from shared.errors import GitHubError, SourceError
from shared.github import GitHub
from shared.jobs import job_url, queue_status, send_statuses, settle_job
from shared.logging import get_logger
from shared.sources import list_entries, load_source

log = get_logger(__name__)

#: Source files fetched from GitHub at once for one push.
_FETCH_CONCURRENCY = 8


@dataclass(frozen=True)
class IntakeResult:
    """What a delivery produced."""

    job_id: int | None
    runs: int
    duplicate: bool = False
    reason: str | None = None


@dataclass(frozen=True)
class FetchedSource:
    path: str
    source: dict[str, Any] | None
    error: SourceError | None


async def take_push(
    event: PushEvent,
    delivery_id: str,
    *,
    pool: asyncpg.Pool,
    broker: Broker,
    github: GitHub,
    settings: Settings,
) -> IntakeResult:
    """Create (or, for a redelivery, complete) the job for one push delivery."""
    existing = await pool.fetchval("SELECT id FROM jobs WHERE delivery_id = $1", delivery_id)
    if existing is not None:
        queued = await queue_job_runs(pool, broker, existing, settings)
        log.info("job.redelivered", job_id=existing, delivery=delivery_id, requeued=queued)
        return IntakeResult(existing, queued, duplicate=True)

    repo, sha = event.repository.full_name, event.after
    paths = event.changed_sources()
    if not paths:
        return IntakeResult(None, 0, reason="no source files changed")
    fetched = await fetch_sources(github, repo, sha, paths)
    if not fetched:
        return IntakeResult(None, 0, reason="changed source files are gone at the head commit")

    async with pool.acquire() as conn, conn.transaction():
        job_id = await conn.fetchval(
            """
            INSERT INTO jobs (delivery_id, event, repo, sha, ref)
            VALUES ($1, 'push', $2, $3, $4)
            ON CONFLICT (delivery_id) DO NOTHING RETURNING id
            """,
            delivery_id, repo, sha, event.ref,
        )
        if job_id is None:  # the same delivery raced in on another request
            return IntakeResult(None, 0, duplicate=True)
        runs = await insert_runs(conn, job_id, sha, fetched)
        await queue_status(
            conn, job_id=job_id, repo=repo, sha=sha, state="pending",
            description=f"Processing {runs} run{'s' if runs != 1 else ''}",
            target_url=job_url(settings.public_base_url, job_id),
        )
        # Sources that could not even be read fail their run at once; if that was all of
        # them the job is already over.
        await settle_job(conn, job_id, settings.public_base_url)
    log.info("job.created", job_id=job_id, repo=repo, sha=sha, runs=runs, delivery=delivery_id)
    await send_statuses(pool, github)
    await queue_job_runs(pool, broker, job_id, settings)
    return IntakeResult(job_id, runs)


async def fetch_sources(
    github: GitHub, repo: str, sha: str, paths: list[str]
) -> list[FetchedSource]:
    """Fetch and parse each source; a file GitHub no longer has at ``sha`` is left out.

    Any other GitHub failure raises :class:`GitHubError` so the delivery fails as a whole and
    can be redelivered; a source that is not valid is kept with its error and fails its run.
    """
    limit = asyncio.Semaphore(_FETCH_CONCURRENCY)

    async def fetch_one(path: str) -> FetchedSource | None:
        async with limit:
            try:
                data = await github.get_contents(repo, path, sha)
            except GitHubError as exc:
                if exc.status == 404:
                    return None
                raise
        try:
            return FetchedSource(path, load_source(data, path=path), None)
        except SourceError as exc:
            return FetchedSource(path, None, exc)

    results = await asyncio.gather(*(fetch_one(path) for path in paths))
    return [result for result in results if result is not None]


async def insert_runs(
    conn: asyncpg.Connection, job_id: int, sha: str, fetched: list[FetchedSource]
) -> int:
    """One run per layer entry; an unreadable source becomes one failed run naming its error."""
    count = 0
    for item in fetched:
        if item.source is None or item.error is not None:
            await conn.execute(
                """
                INSERT INTO runs (job_id, source_path, layer, entry_name, commit_sha, status,
                                  source_problem, error, finished_at)
                VALUES ($1, $2, 'addresses', '', $3, 'failure', $4, $5, now())
                """,
                job_id, item.path, sha, item.error.problem if item.error else "invalid_source",
                str(item.error),
            )
            count += 1
            continue
        try:
            entries = list_entries(item.source)
        except SourceError as exc:
            await conn.execute(
                """
                INSERT INTO runs (job_id, source_path, layer, entry_name, commit_sha, status,
                                  source_problem, error, finished_at)
                VALUES ($1, $2, 'addresses', '', $3, 'failure', $4, $5, now())
                """,
                job_id, item.path, sha, exc.problem, str(exc),
            )
            count += 1
            continue
        for entry in entries:
            await conn.execute(
                """
                INSERT INTO runs (job_id, source_path, layer, entry_name, commit_sha, source)
                VALUES ($1, $2, $3, $4, $5, $6)
                """,
                job_id, item.path, entry.layer, entry.name, sha, item.source,
            )
            count += 1
    return count


async def queue_job_runs(
    pool: asyncpg.Pool, broker: Broker, job_id: int, settings: Settings
) -> int:
    """Queue the job's unqueued runs now; what the broker does not take, the dequeuer's sweep
    queues once it is back. Returns how many were queued."""
    result = await dispatch(
        pool, broker, run_timeout_s=settings.run_timeout_s,
        public_base_url=settings.public_base_url, job_id=job_id, limit=10_000,
    )
    return result.queued

"""Turning a plan (``changes.py``) into a job: runs, the ``pending`` status, the comment, tasks.

Order matters for the commit status: the job, its runs, the ``pending`` status (and, for a pull
request, the request to bring its comment up to date) are written in one transaction together
with the delivery's outcome, the outbox is sent, and only then are the runs queued, so a fast
worker can never make ``success`` arrive before ``pending``. A job with nothing to check ends
at once with a ``success`` status "Nothing to check". Runs the broker does not take (it is
down) stay unqueued and the dequeuer's sweep queues them once it is back
(:mod:`shared.dispatch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from services.webhook.changes import ChangedSource, Plan
from shared.broker import Broker
from shared.config import Settings
from shared.dispatch import dispatch
from shared.github import GitHub
from shared.jobs import (
    NOTHING_TO_CHECK,
    describe_pending,
    job_url,
    queue_comment,
    queue_status,
    settle_job,
)
from shared.logging import get_logger
from shared.outbox import send_statuses

log = get_logger(__name__)


@dataclass(frozen=True)
class IntakeResult:
    """What a delivery produced."""

    job_id: int | None
    runs: int
    duplicate: bool = False


async def create_job(
    conn: asyncpg.Connection, plan: Plan, delivery_id: str, settings: Settings
) -> IntakeResult:
    """Write the job of ``plan`` (call inside the transaction that records the delivery)."""
    job_id = await conn.fetchval(
        """
        INSERT INTO jobs (delivery_id, event, repo, sha, ref, pr_number, head_repo, base_sha,
                          status_context)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
        ON CONFLICT (delivery_id) DO NOTHING RETURNING id
        """,
        delivery_id, plan.event, plan.repo, plan.sha, plan.ref, plan.pr_number, plan.head_repo,
        plan.base_sha, settings.status_context,
    )
    if job_id is None:  # the same delivery was made into a job already
        existing = await conn.fetchval("SELECT id FROM jobs WHERE delivery_id = $1", delivery_id)
        return IntakeResult(existing, 0, duplicate=True)
    runs = await insert_runs(conn, job_id, plan.sha, plan.sources, reuse=plan.reuse)
    target = job_url(settings.public_base_url, job_id)
    if runs == 0:
        await conn.execute(
            "UPDATE jobs SET status = 'success', finished_at = now() WHERE id = $1", job_id
        )
        await queue_status(conn, job_id=job_id, repo=plan.repo, sha=plan.sha, state="success",
                           description=NOTHING_TO_CHECK, target_url=target,
                           context=settings.status_context)
    else:
        paths = [item.path for item in plan.sources if item.entries or item.error]
        await queue_status(conn, job_id=job_id, repo=plan.repo, sha=plan.sha, state="pending",
                           description=describe_pending(paths), target_url=target,
                           context=settings.status_context)
        # Sources that could not even be read fail their run at once; if that was all of
        # them the job is already over.
        await settle_job(conn, job_id, settings.public_base_url)
    if plan.pr_number is not None:
        await queue_comment(conn, job_id=job_id, repo=plan.repo, sha=plan.sha,
                            pr_number=plan.pr_number)
    log.info("job.created", job_id=job_id, kind=plan.event, repo=plan.repo, sha=plan.sha,
             pr=plan.pr_number, runs=runs, delivery=delivery_id, reuse=plan.reuse)
    return IntakeResult(job_id, runs)


async def insert_runs(
    conn: asyncpg.Connection, job_id: int, sha: str, sources: list[ChangedSource], *,
    reuse: bool = True,
) -> int:
    """One run per entry to check; an unreadable source becomes one failed run naming its
    error."""
    count = 0
    for item in sources:
        if item.source is None or item.error is not None:
            problem = item.error.problem if item.error else "invalid_source"
            await conn.execute(
                """
                INSERT INTO runs (job_id, source_path, layer, entry_name, commit_sha, status,
                                  source_problem, error, finished_at)
                VALUES ($1, $2, 'addresses', '', $3, 'failure', $4, $5, now())
                """,
                job_id, item.path, sha, problem, str(item.error),
            )
            count += 1
            continue
        if item.entries:
            # One statement for all the entries of the file: a pull request of 300 files makes
            # 300 round trips fewer.
            await conn.execute(
                """
                INSERT INTO runs (job_id, source_path, layer, entry_name, commit_sha, source,
                                  reuse)
                SELECT $1, $2, e.layer, e.name, $3, $4, $5
                FROM unnest($6::text[], $7::text[]) WITH ORDINALITY AS e(layer, name, n)
                ORDER BY e.n
                """,
                job_id, item.path, sha, item.source, reuse,
                [entry.layer for entry in item.entries], [entry.name for entry in item.entries],
            )
            count += len(item.entries)
    return count


async def queue_runs(
    pool: asyncpg.Pool, broker: Broker, job_id: int, settings: Settings
) -> int:
    """Queue the job's runs (after its ``pending`` status went out); returns how many."""
    result = await dispatch(
        pool, broker, run_timeout_s=settings.run_timeout_s,
        public_base_url=settings.public_base_url, job_id=job_id, limit=10_000,
    )
    return result.queued


async def announce(pool: asyncpg.Pool, github: GitHub, settings: Settings, job_id: int) -> None:
    """Send the new job's ``pending`` status (and its comment) from the outbox; a status of the
    same commit still waiting before it keeps it waiting, as always (the outbox's order)."""
    await send_statuses(pool, github, public_base_url=settings.public_base_url, job_id=job_id)

"""Job lifecycle in SQL, shared by the services that open and settle jobs.

A job is final once every one of its runs is; the first process to see that (guarded by
``WHERE status IS NULL``) records the outcome and queues the commit status in the outbox, in
the same transaction. :func:`send_statuses` delivers the outbox to GitHub in order, and gives
up on a status GitHub can never accept.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import asyncpg

from shared.errors import GitHubError
from shared.github import GitHub, StatusState, is_permanent
from shared.logging import get_logger

log = get_logger(__name__)

#: Longest wait between two tries of one status while GitHub keeps failing.
_MAX_BACKOFF = timedelta(minutes=30)


@dataclass(frozen=True)
class JobOutcome:
    """What settling a job decided."""

    job_id: int
    status: StatusState
    description: str


def job_url(public_base_url: str, job_id: int) -> str:
    """The page of a job, used as the commit status's target URL."""
    return f"{public_base_url.rstrip('/')}/jobs/{job_id}"


async def queue_status(
    conn: asyncpg.Connection,
    *,
    job_id: int | None,
    repo: str,
    sha: str,
    state: StatusState,
    description: str,
    target_url: str | None,
) -> None:
    """Add a commit status to the outbox (call inside the transaction that causes it)."""
    await conn.execute(
        """
        INSERT INTO statuses (job_id, repo, sha, state, description, target_url)
        VALUES ($1, $2, $3, $4, $5, $6)
        """,
        job_id, repo, sha, state, description, target_url,
    )


async def settle_job(
    conn: asyncpg.Connection, job_id: int, public_base_url: str
) -> JobOutcome | None:
    """Finish ``job_id`` if all its runs are final; None while runs are open or if already done.

    Runs inside the caller's transaction. The job row is locked first: two transactions that
    each finish one of the last two runs would otherwise each count the other's run as still
    open (neither sees the other's uncommitted update) and the job would never be settled.
    With the lock the second waits for the first to commit, then (READ COMMITTED: each statement
    sees what committed before it) counts both runs final. ``UPDATE ... WHERE status IS NULL``
    still makes sure the status is queued once.
    """
    await conn.execute("SELECT 1 FROM jobs WHERE id = $1 FOR NO KEY UPDATE", job_id)
    counts = await conn.fetchrow(
        """
        SELECT count(*) FILTER (WHERE status IS NULL)        AS open,
               count(*) FILTER (WHERE status = 'success')    AS succeeded,
               count(*) FILTER (WHERE status = 'skipped')    AS skipped,
               count(*) FILTER (WHERE status = 'failure')    AS failed,
               count(*)                                      AS total
        FROM runs WHERE job_id = $1
        """,
        job_id,
    )
    if counts is None or counts["open"] > 0:
        return None
    state: StatusState = "failure" if counts["failed"] else "success"
    description = _describe(counts["succeeded"], counts["skipped"], counts["failed"])
    job = await conn.fetchrow(
        """
        UPDATE jobs SET status = $2, finished_at = now()
        WHERE id = $1 AND status IS NULL
        RETURNING repo, sha
        """,
        job_id, state,
    )
    if job is None:
        return None
    await queue_status(
        conn, job_id=job_id, repo=job["repo"], sha=job["sha"], state=state,
        description=description, target_url=job_url(public_base_url, job_id),
    )
    log.info("job.finished", job_id=job_id, status=state, description=description)
    return JobOutcome(job_id, state, description)


def _describe(succeeded: int, skipped: int, failed: int) -> str:
    parts = [f"{succeeded} succeeded"]
    if skipped:
        parts.append(f"{skipped} skipped")
    if failed:
        parts.append(f"{failed} failed")
    return "Runs: " + ", ".join(parts)


async def send_statuses(pool: asyncpg.Pool, github: GitHub, *, limit: int = 100) -> int:
    """Post unsent statuses oldest first; returns how many were posted.

    Statuses of one commit must arrive in order (``pending`` before ``success``), so a failure
    worth retrying stops the later statuses of its commit until its next try, which backs off
    (and is never before GitHub's ``Retry-After``). A status GitHub can never accept
    (:func:`shared.github.is_permanent`) is given up instead: kept with its error, never tried
    again, and no longer in the way of the statuses after it. A row is locked while it is sent
    (``FOR UPDATE SKIP LOCKED``) so two senders never post it twice.
    """
    posted = 0
    blocked: set[tuple[str, str]] = set()
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            """
            SELECT id, repo, sha FROM statuses
            WHERE posted_at IS NULL AND given_up_at IS NULL AND next_try_at <= now()
            ORDER BY id LIMIT $1
            """,
            limit,
        )
    for row in rows:
        key = (row["repo"], row["sha"])
        if key in blocked:
            continue
        async with pool.acquire() as conn, conn.transaction():
            status = await conn.fetchrow(
                """
                SELECT * FROM statuses WHERE id = $1 AND posted_at IS NULL AND given_up_at IS NULL
                FOR UPDATE SKIP LOCKED
                """,
                row["id"],
            )
            if status is None:
                continue
            earlier = await conn.fetchval(
                "SELECT 1 FROM statuses WHERE repo = $1 AND sha = $2 AND id < $3"
                " AND posted_at IS NULL AND given_up_at IS NULL",
                status["repo"], status["sha"], status["id"],
            )
            if earlier:
                blocked.add(key)
                continue
            try:
                # A malformed sha raises NotACommit here, before any request: given up below.
                await github.create_status(
                    status["repo"], status["sha"], status["state"],
                    description=status["description"], target_url=status["target_url"],
                    context=status["context"],
                )
            except GitHubError as exc:
                if is_permanent(exc):
                    await _give_up(conn, status, exc)
                else:
                    blocked.add(key)
                    await _try_later(conn, status, exc)
                continue
            await conn.execute(
                "UPDATE statuses SET posted_at = now(), attempts = attempts + 1 WHERE id = $1",
                status["id"],
            )
            posted += 1
            log.info("status.posted", repo=status["repo"], sha=status["sha"],
                     state=status["state"], job_id=status["job_id"])
    return posted


def retry_delay(attempts: int, retry_after_s: float | None) -> timedelta:
    """How long a status that has failed ``attempts`` times (this one included) waits.

    5 s doubling per attempt up to :data:`_MAX_BACKOFF`, and never less than GitHub's
    ``Retry-After``.
    """
    # The exponent is capped before the power: 5 * 2**44 s no longer fits in a timedelta.
    backoff = min(timedelta(seconds=5 * 2 ** min(attempts - 1, 20)), _MAX_BACKOFF)
    if retry_after_s is None:
        return backoff
    return max(backoff, timedelta(seconds=retry_after_s))


async def _try_later(conn: asyncpg.Connection, status: asyncpg.Record, exc: GitHubError) -> None:
    delay = retry_delay(status["attempts"] + 1, exc.retry_after_s)
    await conn.execute(
        """
        UPDATE statuses SET attempts = attempts + 1, last_error = $2,
               next_try_at = now() + $3::interval
        WHERE id = $1
        """,
        status["id"], str(exc)[:1000], delay,
    )
    log.warning("status.failed", status_id=status["id"], error=str(exc),
                retry_in_s=delay.total_seconds())


async def _give_up(conn: asyncpg.Connection, status: asyncpg.Record, exc: GitHubError) -> None:
    await conn.execute(
        """
        UPDATE statuses SET given_up_at = now(), attempts = attempts + 1, last_error = $2
        WHERE id = $1
        """,
        status["id"], str(exc)[:1000],
    )
    log.error("status.given_up", status_id=status["id"], repo=status["repo"],
              sha=status["sha"], error=str(exc))

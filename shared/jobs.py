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

    :func:`settle_jobs` for one job.
    """
    outcomes = await settle_jobs(conn, [job_id], public_base_url)
    return outcomes[0] if outcomes else None


async def settle_jobs(
    conn: asyncpg.Connection, job_ids: list[int], public_base_url: str
) -> list[JobOutcome]:
    """Finish every job of ``job_ids`` whose runs are all final; returns those finished now.

    Runs inside the caller's transaction. The job rows are locked first, in the order of their
    ids (so that two transactions never wait for each other in a circle): two transactions
    that each finish one of the last two runs of a job would otherwise each count the other's
    run as still open (neither sees the other's uncommitted update) and the job would never be
    settled. With the lock the second waits for the first to commit, then (READ COMMITTED:
    each statement sees what committed before it) counts both runs final. ``UPDATE ... WHERE
    status IS NULL`` still makes sure each status is queued once.
    """
    ids = sorted(set(job_ids))
    if not ids:
        return []
    await conn.execute(
        "SELECT 1 FROM jobs WHERE id = ANY($1::bigint[]) ORDER BY id FOR NO KEY UPDATE", ids
    )
    counts = await conn.fetch(
        """
        SELECT job_id,
               count(*) FILTER (WHERE status IS NULL)        AS open,
               count(*) FILTER (WHERE status = 'success')    AS succeeded,
               count(*) FILTER (WHERE status = 'skipped')    AS skipped,
               count(*) FILTER (WHERE status = 'failure')    AS failed
        FROM runs WHERE job_id = ANY($1::bigint[])
        GROUP BY job_id
        """,
        ids,
    )
    decided: dict[int, tuple[StatusState, str]] = {}
    for row in counts:
        if row["open"] == 0:
            state: StatusState = "failure" if row["failed"] else "success"
            decided[row["job_id"]] = (
                state, _describe(row["succeeded"], row["skipped"], row["failed"])
            )
    if not decided:
        return []
    finished = await conn.fetch(
        """
        UPDATE jobs AS j SET status = d.state, finished_at = now()
        FROM unnest($1::bigint[], $2::text[]) AS d(id, state)
        WHERE j.id = d.id AND j.status IS NULL
        RETURNING j.id, j.repo, j.sha
        """,
        list(decided), [state for state, _description in decided.values()],
    )
    outcomes: list[JobOutcome] = []
    for job in sorted(finished, key=lambda row: row["id"]):
        state, description = decided[job["id"]]
        outcomes.append(JobOutcome(job["id"], state, description))
    if outcomes:
        # One statement for every status, in the order of the jobs.
        await conn.execute(
            """
            INSERT INTO statuses (job_id, repo, sha, state, description, target_url)
            SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                                 $6::text[])
            """,
            [o.job_id for o in outcomes],
            [job["repo"] for job in sorted(finished, key=lambda row: row["id"])],
            [job["sha"] for job in sorted(finished, key=lambda row: row["id"])],
            [o.status for o in outcomes], [o.description for o in outcomes],
            [job_url(public_base_url, o.job_id) for o in outcomes],
        )
    for outcome in outcomes:
        log.info("job.finished", job_id=outcome.job_id, status=outcome.status,
                 description=outcome.description)
    return outcomes


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

"""The GitHub outbox: commit statuses and pull-request comments, sent in order, retried, never lost.

A row is written in the same transaction as the state change that causes it
(:mod:`shared.jobs`); :func:`send_statuses` delivers them. Statuses of one commit arrive in
order (``pending`` before ``success``): a failure worth retrying stops the later statuses of its
commit until its next try, which backs off and is never before GitHub's ``Retry-After``. An
answer no retry can change (:func:`shared.github.is_permanent`) gives the row up: kept with its
error, never tried again, no longer in the way of the rows after it.

A comment row asks for the pull request's one comment to be brought up to date: its text is
rendered when it is sent, from the newest job of the pull request's current head
(:mod:`shared.comments`), so the order of comment rows does not matter and sending one sends
every older one of that pull request too. The comment is created the first time and edited in
place afterwards; one that was deleted on GitHub is created again.
"""

from __future__ import annotations

from datetime import timedelta

import asyncpg

from shared.comments import render_comment
from shared.errors import GitHubError
from shared.github import GitHub, is_permanent
from shared.logging import get_logger

log = get_logger(__name__)

#: Longest wait between two tries of one row while GitHub keeps failing.
_MAX_BACKOFF = timedelta(minutes=30)


async def send_statuses(
    pool: asyncpg.Pool, github: GitHub, *, public_base_url: str = "", limit: int = 100,
    job_id: int | None = None,
) -> int:
    """Post unsent statuses oldest first (only ``job_id``'s when given); returns how many were
    posted.

    ``job_id`` is for the process that just made a job and announces it: many deliveries made
    into jobs at once would otherwise each go through every other job's rows too, trying (and
    skipping, locked) each of them; the dequeuer and the retries send everything.

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
            SELECT id, repo, sha, kind, pr_number FROM statuses
            WHERE posted_at IS NULL AND given_up_at IS NULL AND next_try_at <= now()
              AND ($2::bigint IS NULL OR job_id = $2)
            ORDER BY id LIMIT $1
            """,
            limit, job_id,
        )
    for row in rows:
        # Statuses are ordered per commit; comments per pull request.
        key = (row["repo"], row["sha"] if row["kind"] == "status" else f"#{row['pr_number']}")
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
            if status["kind"] == "comment":
                if await _send_comment(conn, github, status, public_base_url):
                    posted += 1
                else:
                    blocked.add(key)
                continue
            earlier = await conn.fetchval(
                "SELECT 1 FROM statuses WHERE repo = $1 AND sha = $2 AND id < $3"
                " AND kind = 'status' AND posted_at IS NULL AND given_up_at IS NULL",
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


async def _send_comment(
    conn: asyncpg.Connection, github: GitHub, row: asyncpg.Record, public_base_url: str
) -> bool:
    """Bring a pull request's comment up to date from its latest job (inside the row's
    transaction); True when done or given up, False to try again later."""
    repo, number = row["repo"], row["pr_number"]
    # Locked, so two senders never both create the comment.
    await conn.execute(
        "INSERT INTO pull_requests (repo, number) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        repo, number,
    )
    pull = await conn.fetchrow(
        "SELECT comment_id, head_sha FROM pull_requests WHERE repo = $1 AND number = $2"
        " FOR UPDATE",
        repo, number,
    )
    assert pull is not None
    comment_id = pull["comment_id"]
    # The newest job of the pull request's head; a job of an older commit made late (its
    # delivery retried after GitHub failed) does not take the comment over.
    job = await conn.fetchrow(
        """
        SELECT * FROM jobs WHERE repo = $1 AND pr_number = $2
        ORDER BY sha IS NOT DISTINCT FROM $3 DESC, id DESC LIMIT 1
        """,
        repo, number, pull["head_sha"],
    )
    if job is None:
        await _mark_comments_sent(conn, repo, number, row["id"])
        return True
    runs = await conn.fetch(
        """
        SELECT id, source_path, layer, entry_name, status, source_problem, outputs, state
        FROM runs WHERE job_id = $1 ORDER BY source_path, layer, entry_name, id
        """,
        job["id"],
    )
    body = render_comment(job, runs, public_base_url)
    try:
        if comment_id is not None:
            try:
                await github.update_comment(repo, comment_id, body)
            except GitHubError as exc:
                if exc.status != 404:
                    raise
                comment_id = None  # deleted on GitHub: a new one
        if comment_id is None:
            comment_id = await github.create_comment(repo, number, body)
            await conn.execute(
                "UPDATE pull_requests SET comment_id = $3 WHERE repo = $1 AND number = $2",
                repo, number, comment_id,
            )
    except GitHubError as exc:
        if is_permanent(exc):
            await _give_up(conn, row, exc)
            return True
        await _try_later(conn, row, exc)
        return False
    await _mark_comments_sent(conn, repo, number, row["id"])
    log.info("comment.posted", repo=repo, pr=number, job_id=job["id"], comment_id=comment_id)
    return True


async def _mark_comments_sent(
    conn: asyncpg.Connection, repo: str, number: int, up_to_id: int
) -> None:
    # The comment shows the latest job: every older request for it is answered too.
    await conn.execute(
        """
        UPDATE statuses SET posted_at = now(), attempts = attempts + 1
        WHERE kind = 'comment' AND repo = $1 AND pr_number = $2 AND id <= $3
          AND posted_at IS NULL AND given_up_at IS NULL
        """,
        repo, number, up_to_id,
    )

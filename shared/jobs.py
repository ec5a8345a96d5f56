"""Job lifecycle in SQL, shared by the services that open and settle jobs.

A job is final once every one of its runs is; the first process to see that (guarded by
``WHERE status IS NULL``) records the outcome and queues the commit status in the outbox, in
the same transaction (and, for a pull request, a refresh of its comment). The outbox is sent
by :func:`shared.outbox.send_statuses`.

Status descriptions (one place for their wording, each within GitHub's 140 characters):
``pending`` names what is checked ("Checking us/ca/alameda, us/ca/berkeley and 3 more"),
``failure`` the failed sources with their problem codes, ``success`` the counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from shared.github import STATUS_CONTEXT, StatusState, fit_description
from shared.logging import get_logger

log = get_logger(__name__)

#: The status of a job that found nothing to check (no entry new or changed).
NOTHING_TO_CHECK = "Nothing to check"


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
    context: str = STATUS_CONTEXT,
) -> None:
    """Add a commit status to the outbox (call inside the transaction that causes it)."""
    await conn.execute(
        """
        INSERT INTO statuses (job_id, repo, sha, state, description, target_url, context)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        """,
        job_id, repo, sha, state, fit_description(description), target_url, context,
    )


async def queue_comment(
    conn: asyncpg.Connection, *, job_id: int, repo: str, sha: str, pr_number: int
) -> None:
    """Ask for the pull request's comment to be brought up to date (inside the transaction)."""
    await conn.execute(
        """
        INSERT INTO statuses (kind, job_id, repo, sha, pr_number, description)
        VALUES ('comment', $1, $2, $3, $4, '')
        """,
        job_id, repo, sha, pr_number,
    )


def source_name(path: str) -> str:
    """``sources/us/ca/alameda.json`` → ``us/ca/alameda``, as contributors name sources."""
    name = path.removeprefix("sources/")
    return name.removesuffix(".json")


def _names_within(prefix: str, names: Sequence[str], suffix: str = "") -> str:
    """``prefix`` + as many ``names`` as fit in 140 characters + "and N more" + ``suffix``."""
    shown: list[str] = []
    for index, name in enumerate(names):
        rest = len(names) - index - 1
        candidate = ", ".join([*shown, name])
        tail = f" and {rest} more" if rest else ""
        if len(prefix + candidate + tail + suffix) > 140 and shown:
            break
        shown.append(name)
    more = len(names) - len(shown)
    text = prefix + ", ".join(shown)
    if more:
        text += f" and {more} more"
    return fit_description(text + suffix)


def describe_pending(paths: Sequence[str]) -> str:
    """``pending``: what the job checks."""
    names = sorted({source_name(path) for path in paths})
    if not names:
        return NOTHING_TO_CHECK
    return _names_within("Checking ", names)


def describe_outcome(
    succeeded: int, skipped: int, failures: Sequence[tuple[str, str | None]],
    warned: Sequence[str] = (),
) -> str:
    """``success`` or ``failure``: the counts, the failed sources with their problems, and the
    sources whose counts fell (regression warnings)."""
    if failures:
        named = [f"{source_name(path)} ({problem or 'failed'})" for path, problem in failures]
        counts = f"; {succeeded} succeeded" if succeeded else ""
        return _names_within("Failed: ", named, counts)
    if warned:
        return _names_within(f"{succeeded} succeeded; fewer features than before: ",
                             sorted({source_name(path) for path in warned}))
    if skipped:
        return f"{succeeded} succeeded, {skipped} skipped"
    return f"All {succeeded} run{'s' if succeeded != 1 else ''} succeeded"


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
    done = [row for row in counts if row["open"] == 0]
    if not done:
        return []
    failures: dict[int, list[tuple[str, str | None]]] = {}
    warned: dict[int, list[str]] = {}
    for item in await conn.fetch(
        """
        SELECT job_id, source_path, source_problem, status FROM runs
        WHERE job_id = ANY($1::bigint[]) AND (status = 'failure' OR warning IS NOT NULL)
        ORDER BY job_id, source_path, id
        """,
        [row["job_id"] for row in done],
    ):
        if item["status"] == "failure":
            failures.setdefault(item["job_id"], []).append(
                (item["source_path"], item["source_problem"]))
        else:
            warned.setdefault(item["job_id"], []).append(item["source_path"])
    decided: dict[int, tuple[StatusState, str]] = {}
    for row in done:
        state: StatusState = "failure" if row["failed"] else "success"
        decided[row["job_id"]] = (
            state, describe_outcome(row["succeeded"], row["skipped"],
                                    failures.get(row["job_id"], []),
                                    warned.get(row["job_id"], [])),
        )
    finished = await conn.fetch(
        """
        UPDATE jobs AS j SET status = d.state, finished_at = now()
        FROM unnest($1::bigint[], $2::text[]) AS d(id, state)
        WHERE j.id = d.id AND j.status IS NULL
        RETURNING j.id, j.repo, j.sha, j.status_context, j.pr_number
        """,
        list(decided), [state for state, _description in decided.values()],
    )
    outcomes: list[JobOutcome] = []
    for job in sorted(finished, key=lambda row: row["id"]):
        state, description = decided[job["id"]]
        outcomes.append(JobOutcome(job["id"], state, description))
    jobs = sorted(finished, key=lambda row: row["id"])
    if outcomes:
        # One statement for every status, in the order of the jobs; pull requests also get
        # their comment brought up to date.
        await conn.execute(
            """
            INSERT INTO statuses (kind, job_id, repo, sha, state, description, target_url,
                                  context, pr_number)
            SELECT 'status', o.job_id, o.repo, o.sha, o.state, o.description, o.target_url,
                   o.context, NULL
            FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                        $6::text[], $7::text[])
                 AS o(job_id, repo, sha, state, description, target_url, context)
            UNION ALL
            SELECT 'comment', c.job_id, c.repo, c.sha, NULL, '', NULL, 'comment', c.pr_number
            FROM unnest($1::bigint[], $2::text[], $3::text[], $8::int[])
                 AS c(job_id, repo, sha, pr_number)
            WHERE c.pr_number IS NOT NULL
            ORDER BY 1 DESC, 2
            """,
            [o.job_id for o in outcomes], [job["repo"] for job in jobs],
            [job["sha"] for job in jobs], [o.status for o in outcomes],
            [fit_description(o.description) for o in outcomes],
            [job_url(public_base_url, o.job_id) for o in outcomes],
            [job["status_context"] for job in jobs], [job["pr_number"] for job in jobs],
        )
    for outcome in outcomes:
        log.info("job.finished", job_id=outcome.job_id, status=outcome.status,
                 description=outcome.description)
    return outcomes



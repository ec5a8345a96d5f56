"""Queueing runs: the one place that turns open runs into tasks on the `tasks` queue.

A run is *unqueued* while it is open and ``queued_at`` is NULL: new (a push, a batch set), handed
back by a stopping worker, presumed lost, or waiting for a retry whose time has come. Whoever
wants runs queued (the webhook for the job it just created, the dequeuer's sweep for everything
else) calls :func:`dispatch`, which

1. *claims* a batch of unqueued runs in one statement (``queued_at = now()`` under ``FOR UPDATE
   SKIP LOCKED``), so two dispatchers never queue the same run twice;
2. publishes a task for each, with the run's current ``attempt``;
3. gives back the claim of every run it could not publish (the broker is down), so the next
   sweep queues them. A process that dies between 1 and 3 leaves runs that look queued but are
   not: the dequeuer finds those by their missing heartbeat once the queue has drained
   (``unseen_since``, see ``services/dequeuer/recovery.py``).

Job runs go before batch-set runs, oldest first, so a contributor's pull request does not wait
behind the weekly set.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import asyncpg

from shared.broker import Broker, PublishError
from shared.errors import SourceError
from shared.jobs import settle_job
from shared.logging import get_logger
from shared.messages import EXCHANGE_TASKS, ROUTE_TASK, PreviousRun, Task
from shared.sets import settle_sets
from shared.sources import entry_timeout_s, get_entry

log = get_logger(__name__)

#: Runs claimed and published per round.
BATCH = 200
#: Tasks published at once (their confirms awaited together).
PUBLISH_WINDOW = 64


@dataclass(frozen=True)
class DispatchResult:
    """What a call of :func:`dispatch` did."""

    queued: int
    #: Runs left unqueued because the broker did not take their task.
    left: int = 0
    #: Runs failed at once because their entry cannot be run at all.
    failed: int = 0


async def dispatch(
    pool: asyncpg.Pool,
    broker: Broker,
    *,
    run_timeout_s: float,
    public_base_url: str,
    job_id: int | None = None,
    limit: int = BATCH,
    batch_room: int = BATCH,
) -> DispatchResult:
    """Queue up to ``limit`` unqueued runs of jobs (only those of ``job_id`` when given) and,
    without ``job_id``, up to ``batch_room`` runs of batch sets (the room left in the queue,
    which the caller works out: back-pressure)."""
    if not broker.ready:
        # Nothing would be published; leave the runs unqueued at once instead of waiting for
        # the broker on every one of them (GitHub gives up on a webhook after 10 s).
        log.info("runs.queue_deferred", reason="broker not connected", job_id=job_id)
        return DispatchResult(0)
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            """
            WITH of_jobs AS (
                SELECT id FROM runs
                WHERE status IS NULL AND queued_at IS NULL
                  AND (retry_at IS NULL OR retry_at <= now())
                  AND job_id IS NOT NULL AND ($1::bigint IS NULL OR job_id = $1)
                ORDER BY id LIMIT $2
                FOR UPDATE SKIP LOCKED
            ), of_sets AS (
                -- In the order they were made: a set's longest entries first.
                SELECT id FROM runs
                WHERE status IS NULL AND queued_at IS NULL
                  AND (retry_at IS NULL OR retry_at <= now())
                  AND job_id IS NULL AND $1::bigint IS NULL
                ORDER BY id LIMIT $3
                FOR UPDATE SKIP LOCKED
            )
            UPDATE runs SET queued_at = now(), unseen_since = NULL
            WHERE id IN (SELECT id FROM of_jobs UNION ALL SELECT id FROM of_sets)
            RETURNING id, job_id, set_id, source_path, layer, entry_name, commit_sha, source,
                      attempt, reuse, reuse_since
            """,
            job_id, limit, 0 if job_id is not None else max(batch_room, 0),
        )
    rows = sorted(rows, key=lambda row: (row["job_id"] is None, row["id"]))
    ready: list[tuple[asyncpg.Record, Task]] = []
    failed = 0
    # A re-run asked for in a comment must not reuse anything: it exists to do it again.
    earlier = await latest_successes(
        pool, [(row["source_path"], row["layer"], row["entry_name"]) for row in rows
               if row["reuse"]])
    for row in rows:
        try:
            previous = earlier.get((row["source_path"], row["layer"], row["entry_name"]))
            if previous is not None and row["reuse_since"] is not None and (
                previous["finished_at"] < row["reuse_since"]
            ):
                previous = None  # too old for this batch set to reuse
            ready.append((row, _task_for(row, run_timeout_s, previous)))
        except SourceError as exc:
            await _fail(pool, row, exc, public_base_url)
            failed += 1
    queued = 0
    left: list[int] = []
    for start in range(0, len(ready), PUBLISH_WINDOW):
        window = ready[start:start + PUBLISH_WINDOW]
        if left:  # the broker refused already: the rest waits for the sweep
            left.extend(row["id"] for row, _task in window)
            continue
        # Published together: each confirm is a round trip, and a job's runs need not wait
        # for each other's.
        results = await asyncio.gather(
            *(broker.publish(EXCHANGE_TASKS, ROUTE_TASK, task) for _row, task in window),
            return_exceptions=True,
        )
        for (row, _task), result in zip(window, results, strict=True):
            if isinstance(result, PublishError):
                left.append(row["id"])
            elif isinstance(result, BaseException):
                raise result
            else:
                queued += 1
                log.info("run.queued", run_id=row["id"], job_id=row["job_id"],
                         set_id=row["set_id"], source=row["source_path"], layer=row["layer"],
                         entry=row["entry_name"], attempt=row["attempt"])
    if left:
        await _unclaim(pool, left)
        log.warning("runs.queue_failed", runs=len(left))
    return DispatchResult(queued, len(left), failed)


def _task_for(
    row: asyncpg.Record, run_timeout_s: float, earlier: asyncpg.Record | None
) -> Task:
    source = row["source"]
    if not isinstance(source, dict):
        raise SourceError("the run has no source to process")
    entry = get_entry(source, row["layer"], row["entry_name"])
    return Task(
        run_id=row["id"], job_id=row["job_id"], set_id=row["set_id"], attempt=row["attempt"],
        source_path=row["source_path"], layer=row["layer"], entry_name=row["entry_name"],
        commit_sha=row["commit_sha"], source=source,
        timeout_s=entry_timeout_s(entry, run_timeout_s),
        previous=reusable(earlier, row["layer"], row["entry_name"], entry),
    )


async def _unclaim(pool: asyncpg.Pool, run_ids: list[int]) -> None:
    # Best effort: if the database is gone too, the unseen-task sweep finds these runs later.
    try:
        await pool.execute(
            "UPDATE runs SET queued_at = NULL WHERE id = ANY($1::bigint[]) AND status IS NULL",
            run_ids,
        )
    except Exception as exc:
        log.warning("runs.unclaim_failed", runs=len(run_ids), error=repr(exc))


async def _fail(
    pool: asyncpg.Pool, row: asyncpg.Record, exc: SourceError, public_base_url: str
) -> None:
    async with pool.acquire() as conn, conn.transaction():
        settled = await conn.fetchrow(
            """
            UPDATE runs SET status = 'failure', source_problem = $2, error = $3,
                   finished_at = now(), queued_at = NULL
            WHERE id = $1 AND status IS NULL RETURNING job_id, set_id
            """,
            row["id"], exc.problem, str(exc),
        )
        if settled is not None and settled["job_id"] is not None:
            await settle_job(conn, settled["job_id"], public_base_url)
        if settled is not None and settled["set_id"] is not None:
            await settle_sets(conn, [settled["set_id"]])
    log.error("run.failed", run_id=row["id"], problem=exc.problem, error=str(exc))


async def latest_successes(
    pool: asyncpg.Pool, keys: list[tuple[str, str, str]]
) -> dict[tuple[str, str, str], asyncpg.Record]:
    """The latest good run (successful, without a regression warning, outputs kept) of each
    ``(source path, layer, entry name)``, in one query."""
    if not keys:
        return {}
    rows = await pool.fetch(
        """
        SELECT DISTINCT ON (r.source_path, r.layer, r.entry_name)
               r.id, r.source_path, r.layer, r.entry_name, r.source, r.outputs, r.state,
               r.fingerprint, r.etag, r.last_modified, r.finished_at
        FROM runs AS r
        JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(path, layer, name)
          ON r.source_path = k.path AND r.layer = k.layer AND r.entry_name = k.name
        -- A run that warned of a regression is not the entry's good data: the one before is.
        WHERE r.status = 'success' AND r.warning IS NULL AND r.purged_at IS NULL
        ORDER BY r.source_path, r.layer, r.entry_name, r.finished_at DESC
        """,
        [key[0] for key in keys], [key[1] for key in keys], [key[2] for key in keys],
    )
    return {(row["source_path"], row["layer"], row["entry_name"]): row for row in rows}


def reusable(
    earlier: asyncpg.Record | None, layer: str, name: str, entry: dict[str, Any]
) -> PreviousRun | None:
    """``earlier`` (the latest successful run of the entry) if the entry is unchanged since.

    Only an identical entry qualifies: a changed conform must be re-run even on the same data.
    """
    if earlier is None or earlier["source"] is None:
        return None
    try:
        before = get_entry(earlier["source"], layer, name)
    except SourceError:
        return None
    if before != entry:
        return None
    return PreviousRun(
        run_id=earlier["id"], fingerprint=earlier["fingerprint"], etag=earlier["etag"],
        last_modified=earlier["last_modified"], outputs=earlier["outputs"],
        state=earlier["state"],
    )

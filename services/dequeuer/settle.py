"""Settling runs from `done`, `returned`, heartbeats and `due` messages, guarded in SQL.

Every update names the run *and its current attempt*: ``WHERE id = $1 AND status IS NULL AND
attempt = $2``. So a duplicate message, a `done` that lost the race with `due`, and a late
message from a worker whose attempt was superseded (it was presumed lost, or handed the run
back, and the run went to another worker) all change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import asyncpg

from services.dequeuer.recovery import Rules, release
from services.dequeuer.regressions import mark_regressions
from shared import metrics
from shared.jobs import settle_job, settle_jobs
from shared.logging import get_logger
from shared.messages import Done, Due, Heartbeat, Returned
from shared.sets import settle_sets

log = get_logger(__name__)

__all__ = ["Outcome", "Rules", "overdue_runs", "record_heartbeat", "record_returned",
           "settle_done", "settle_done_batch", "settle_due"]


@dataclass(frozen=True)
class Outcome:
    """What a `done` did: ``settled`` (final), ``retry`` (run again later) or ``ignored``."""

    action: str
    job_finished: bool = False
    #: A run of a batch set settled: there is room in the queue for another.
    set_run: bool = False

    def __bool__(self) -> bool:
        return self.action != "ignored"


async def settle_done(pool: asyncpg.Pool, done: Done, rules: Rules) -> Outcome:
    """Record a run's result once, or schedule the whole run again after a transient failure."""
    async with pool.acquire() as conn, conn.transaction():
        if done.status == "failure" and done.retryable:
            retry = await conn.fetchrow(
                """
                UPDATE runs SET retries = retries + 1, attempt = attempt + 1,
                       retry_at = now() + $3::interval, queued_at = NULL, lease_until = NULL,
                       deadline_at = NULL, started_at = NULL, unseen_since = NULL,
                       worker = $4, error = $5, outputs = $6, state = $7
                WHERE id = $1 AND status IS NULL AND attempt = $2 AND retries < $8
                RETURNING job_id, retries, retry_at
                """,
                done.run_id, done.attempt, timedelta(seconds=rules.run_retry_delay_s),
                done.worker, f"will be tried again: {done.error}", done.outputs, done.state,
                rules.run_retry_max,
            )
            if retry is not None:
                metrics.RUNS_REQUEUED.labels("retry").inc()
                log.warning("run.retry_scheduled", run_id=done.run_id, job_id=retry["job_id"],
                            retries=retry["retries"], retry_at=retry["retry_at"].isoformat(),
                            error=done.error)
                return Outcome("retry")
    # Anything that is not a retry is settled as a batch of one: one place for that logic.
    return (await settle_done_batch(pool, [done], rules, retried=True))[0]


async def settle_done_batch(
    pool: asyncpg.Pool, dones: list[Done], rules: Rules, *, retried: bool = False
) -> list[Outcome]:
    """:func:`settle_done` for many results in one transaction; one outcome per message.

    Results asking for a retry go through :func:`settle_done` one by one (they are rare); the
    others are settled by one ``UPDATE ... FROM unnest(...)``, then every job they touch is
    settled, in the order of its id so that two dequeuers lock jobs in the same order. The
    same attempt of a run twice in a batch: the first message counts, the others are duplicates.
    """
    outcomes: dict[int, Outcome] = {}
    final: list[tuple[int, Done]] = []
    seen: set[tuple[int, int]] = set()
    for index, done in enumerate(dones):
        if done.status == "failure" and done.retryable and not retried:
            outcomes[index] = await settle_done(pool, done, rules)
        elif (done.run_id, done.attempt) in seen:
            log.info("run.duplicate_done", run_id=done.run_id, attempt=done.attempt,
                     detail="the same attempt twice in one batch")
            outcomes[index] = Outcome("ignored")
        else:
            # Two attempts of one run may both be here: only the current one can match.
            seen.add((done.run_id, done.attempt))
            final.append((index, done))
    if final:
        final.sort(key=lambda item: (item[1].run_id, item[0]))  # rows locked in one order
        batch = [done for _index, done in final]
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """
                UPDATE runs AS r SET status = i.status, source_problem = i.problem,
                       error = CASE WHEN r.retries > 0 AND i.status = 'failure'
                                    THEN i.error || ' (the whole run was tried '
                                         || (r.retries + 1) || ' times)'
                                    ELSE i.error END,
                       outputs = i.outputs, state = i.state, worker = i.worker,
                       started_at = coalesce(r.started_at, i.started_at, i.finished_at),
                       finished_at = i.finished_at,
                       lease_until = NULL, retry_at = NULL, unseen_since = NULL,
                       fingerprint = i.state ->> 'fingerprint', etag = i.state ->> 'etag',
                       last_modified = i.state ->> 'last modified'
                FROM unnest($1::bigint[], $2::int[], $3::text[], $4::text[], $5::text[],
                            $6::jsonb[], $7::jsonb[], $8::text[], $9::timestamptz[],
                            $10::timestamptz[])
                     AS i(run_id, attempt, status, problem, error, outputs, state, worker,
                          started_at, finished_at)
                WHERE r.id = i.run_id AND r.status IS NULL AND r.attempt = i.attempt
                RETURNING r.id, r.attempt, r.job_id, r.set_id, r.started_at, r.finished_at,
                          r.status, r.source_path, r.layer, r.entry_name, r.state
                """,
                [d.run_id for d in batch], [d.attempt for d in batch],
                [d.status for d in batch], [d.source_problem for d in batch],
                [d.error for d in batch], [d.outputs for d in batch], [d.state for d in batch],
                [d.worker for d in batch], [d.started_at for d in batch],
                [d.finished_at for d in batch],
            )
            settled = {(row["id"], row["attempt"]): row for row in rows}
            # Before the jobs settle, so that their statuses can name the warnings.
            warnings = await mark_regressions(
                conn, [row for row in rows if row["status"] == "success"],
                rules.regression_threshold)
            touched = [row["job_id"] for row in rows if row["job_id"] is not None]
            finished_jobs = {outcome.job_id for outcome in
                             await settle_jobs(conn, touched, rules.public_base_url)}
            await settle_sets(conn, [row["set_id"] for row in rows if row["set_id"] is not None])
            for _index, done in final:
                if (done.run_id, done.attempt) not in settled:
                    await _explain_ignored(conn, done.run_id, done.attempt, "done", done.status)
        for index, done in final:
            row = settled.get((done.run_id, done.attempt))
            if row is None:
                outcomes[index] = Outcome("ignored")
                continue
            warning = warnings.get(row["id"])
            log.info("run.finished", run_id=done.run_id, job_id=row["job_id"],
                     set_id=row["set_id"], status=done.status, problem=done.source_problem,
                     attempt=done.attempt, **({"warning": warning} if warning else {}))
            metrics.RUNS_SETTLED.labels(done.status, done.source_problem or "").inc()
            elapsed = (row["finished_at"] - row["started_at"]).total_seconds()
            metrics.RUN_DURATION.labels(done.status).observe(max(elapsed, 0.0))
            outcomes[index] = Outcome("settled", row["job_id"] in finished_jobs,
                                      set_run=row["set_id"] is not None)
    return [outcomes[index] for index in range(len(dones))]


async def _explain_ignored(
    conn: asyncpg.Connection, run_id: int, attempt: int, kind: str, detail: str | None
) -> None:
    current = await conn.fetchrow("SELECT status, attempt FROM runs WHERE id = $1", run_id)
    if current is None:
        log.warning(f"run.{kind}_for_unknown_run", run_id=run_id, attempt=attempt)
    elif current["status"] is not None:
        log.info(f"run.duplicate_{kind}", run_id=run_id, attempt=attempt, detail=detail,
                 final=current["status"])
    else:
        log.info(f"run.superseded_{kind}", run_id=run_id, attempt=attempt, detail=detail,
                 current_attempt=current["attempt"])


async def settle_due(pool: asyncpg.Pool, due: Due, public_base_url: str) -> bool:
    """Fail a run whose deadline passed without a `done`; False if it was already final."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            """
            UPDATE runs SET status = 'failure', source_problem = 'timeout', finished_at = now(),
                   lease_until = NULL,
                   error = 'no result from the worker before the deadline ' || deadline_at::text
            WHERE id = $1 AND status IS NULL AND attempt = $2 AND deadline_at <= now()
            RETURNING job_id, set_id
            """,
            due.run_id, due.attempt,
        )
        if row is None:
            return False
        log.warning("run.timed_out", run_id=due.run_id, job_id=row["job_id"])
        if row["job_id"] is not None:
            await settle_job(conn, row["job_id"], public_base_url)
        if row["set_id"] is not None:
            await settle_sets(conn, [row["set_id"]])
    metrics.RUNS_SETTLED.labels("failure", "timeout").inc()
    return True


async def record_returned(pool: asyncpg.Pool, returned: Returned, rules: Rules) -> bool:
    """A worker handed a run back: queue it again, or fail it once its attempts are used up."""
    async with pool.acquire() as conn, conn.transaction():
        action = await release(
            conn, returned.run_id, returned.attempt, reason="returned",
            detail=f"worker {returned.worker} handed it back ({returned.reason})", rules=rules,
        )
        if action is None:
            await _explain_ignored(conn, returned.run_id, returned.attempt, "returned", None)
    return action is not None


async def record_heartbeat(pool: asyncpg.Pool, beat: Heartbeat, rules: Rules) -> None:
    """Upsert the worker; a beat naming the current attempt of an open run renews its lease.

    The first beat of an attempt (sent before the worker acknowledges the task) also marks the
    run started and sets its deadline.
    """
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """
            INSERT INTO workers (name, hostname, pid, state, run_id, started_at, last_seen_at,
                                 status)
            VALUES ($1, $2, $3, $4, $5, $6, $6, 'active')
            ON CONFLICT (name) DO UPDATE SET hostname = $2, pid = $3, state = $4, run_id = $5,
                   last_seen_at = greatest(workers.last_seen_at, $6), status = 'active'
            """,
            beat.worker, beat.hostname, beat.pid, beat.state, beat.run_id, beat.sent_at,
        )
        if beat.run_id is not None:
            await conn.execute(
                """
                UPDATE runs SET worker = $2, started_at = coalesce(started_at, $3),
                       deadline_at = coalesce($4, deadline_at),
                       lease_until = greatest(lease_until, now() + $6::interval),
                       unseen_since = NULL
                WHERE id = $1 AND status IS NULL AND attempt = $5
                """,
                beat.run_id, beat.worker, beat.sent_at, beat.deadline_at, beat.attempt or 1,
                timedelta(seconds=rules.run_lease_s),
            )


async def overdue_runs(pool: asyncpg.Pool, *, limit: int = 500) -> list[Due]:
    """`due` messages for open runs whose deadline has passed."""
    rows = await pool.fetch(
        """
        SELECT id, attempt, deadline_at FROM runs
        WHERE status IS NULL AND deadline_at <= now() ORDER BY deadline_at LIMIT $1
        """,
        limit,
    )
    return [Due(run_id=r["id"], attempt=r["attempt"], deadline_at=r["deadline_at"]) for r in rows]

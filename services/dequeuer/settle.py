"""Settling runs from `done`, heartbeats and `due` messages, guarded in SQL.

Whichever of `done` and `due` reaches a run first wins: both update only ``WHERE status IS
NULL``, so a duplicate or late message changes nothing.
"""

from __future__ import annotations

from datetime import timedelta

import asyncpg

from shared.jobs import settle_job
from shared.logging import get_logger
from shared.messages import Done, Due, Heartbeat

log = get_logger(__name__)


async def settle_done(pool: asyncpg.Pool, done: Done, public_base_url: str) -> bool:
    """Record a run's outcome once; returns False when the run was already final."""
    async with pool.acquire() as conn, conn.transaction():
        job_id = await conn.fetchrow(
            """
            UPDATE runs SET status = $2, source_problem = $3, error = $4, outputs = $5,
                   state = $6, worker = $7, attempt = greatest(attempt, $8),
                   started_at = coalesce(started_at, $9, $10), finished_at = $10,
                   fingerprint = $6::jsonb ->> 'fingerprint', etag = $6::jsonb ->> 'etag',
                   last_modified = $6::jsonb ->> 'last modified'
            WHERE id = $1 AND status IS NULL
            RETURNING job_id
            """,
            done.run_id, done.status, done.source_problem, done.error, done.outputs,
            done.state, done.worker, done.attempt, done.started_at, done.finished_at,
        )
        if job_id is None:
            log.info("run.duplicate_done", run_id=done.run_id, status=done.status)
            return False
        log.info("run.finished", run_id=done.run_id, job_id=job_id["job_id"], status=done.status,
                 problem=done.source_problem)
        if job_id["job_id"] is not None:
            await settle_job(conn, job_id["job_id"], public_base_url)
    return True


async def settle_due(pool: asyncpg.Pool, due: Due, public_base_url: str) -> bool:
    """Fail a run whose deadline passed without a `done`; False if it was already final."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            """
            UPDATE runs SET status = 'failure', source_problem = 'timeout', finished_at = now(),
                   error = 'no result from the worker before the deadline ' || deadline_at::text
            WHERE id = $1 AND status IS NULL AND deadline_at <= now()
            RETURNING job_id
            """,
            due.run_id,
        )
        if row is None:
            return False
        log.warning("run.timed_out", run_id=due.run_id, job_id=row["job_id"])
        if row["job_id"] is not None:
            await settle_job(conn, row["job_id"], public_base_url)
    return True


async def record_heartbeat(pool: asyncpg.Pool, beat: Heartbeat) -> None:
    """Upsert the worker; the first heartbeat naming a run marks it started with its deadline."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """
            INSERT INTO workers (name, hostname, pid, state, run_id, started_at, last_seen_at)
            VALUES ($1, $2, $3, $4, $5, $6, $6)
            ON CONFLICT (name) DO UPDATE SET hostname = $2, pid = $3, state = $4, run_id = $5,
                   last_seen_at = greatest(workers.last_seen_at, $6)
            """,
            beat.worker, beat.hostname, beat.pid, beat.state, beat.run_id, beat.sent_at,
        )
        if beat.run_id is not None:
            await conn.execute(
                """
                UPDATE runs SET worker = $2, started_at = coalesce(started_at, $3),
                       deadline_at = coalesce($4, deadline_at)
                WHERE id = $1 AND status IS NULL
                """,
                beat.run_id, beat.worker, beat.sent_at, beat.deadline_at,
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


#: How often the dequeuer sends statuses and looks for overdue runs.
TICK = timedelta(seconds=10)

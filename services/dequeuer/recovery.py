"""Giving lost work back: expired leases, handed-back runs, tasks lost on their way.

A run goes back to the queue with ``attempt + 1`` (the order monitor's rule: retry what failed
for lack of a worker, up to a number of attempts) when

* its worker handed it back (``returned``: SIGTERM and the grace period ran out);
* its lease expired: no heartbeat naming the attempt for ``RUN_LEASE_S`` (the worker was
  killed, its host vanished, its network is cut);
* its task vanished: the run is marked queued, no worker ever announced it, and the `tasks`
  queue was seen empty twice, ``RUN_LEASE_S`` apart (a dispatcher died between claiming and
  publishing, or someone purged the queue).

Each of these counts one *lost attempt*; the run fails (``worker_lost``) with a message saying
so once it has lost ``RUN_MAX_ATTEMPTS``. The new attempt number fences off the old one: a late
`done` or heartbeat of the old attempt changes nothing (``services/dequeuer/settle.py``).

Presuming a run lost while its heartbeats wait in a backlog would run it twice, so the dequeuer
only expires leases after a quiet spell (no outage of its own for ``RUN_LEASE_S``) and while the
`done` queue is nearly drained (``services/dequeuer/service.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import asyncpg

from shared import metrics
from shared.config import Settings
from shared.jobs import settle_job
from shared.logging import get_logger
from shared.sets import settle_sets

log = get_logger(__name__)

ReleaseReason = Literal["lost", "returned", "unseen"]


@dataclass(frozen=True)
class Rules:
    """The settings that decide what happens to a run (a subset of :class:`Settings`)."""

    public_base_url: str
    run_lease_s: float = 120.0
    run_max_attempts: int = 3
    run_retry_delay_s: float = 3600.0
    run_retry_max: int = 3
    regression_threshold: float = 0.10

    @classmethod
    def of(cls, settings: Settings) -> Rules:
        return cls(
            public_base_url=settings.public_base_url, run_lease_s=settings.run_lease_s,
            run_max_attempts=settings.run_max_attempts,
            run_retry_delay_s=settings.run_retry_delay_s, run_retry_max=settings.run_retry_max,
            regression_threshold=settings.regression_threshold,
        )


async def release(
    conn: asyncpg.Connection,
    run_id: int,
    attempt: int,
    *,
    reason: ReleaseReason,
    detail: str,
    rules: Rules,
) -> Literal["requeued", "failed"] | None:
    """End ``attempt`` of an open run without a result (call inside a transaction).

    The run becomes unqueued with ``attempt + 1`` (the dispatcher queues it), or fails once it
    has lost ``run_max_attempts``. None when the attempt is not current (already released,
    settled, or a stale message).
    """
    row = await conn.fetchrow(
        """
        UPDATE runs SET attempt = attempt + 1, lost_attempts = lost_attempts + 1,
               queued_at = NULL, lease_until = NULL, deadline_at = NULL, started_at = NULL,
               unseen_since = NULL, error = $3
        WHERE id = $1 AND status IS NULL AND attempt = $2
        RETURNING job_id, set_id, lost_attempts, attempt
        """,
        run_id, attempt, f"attempt {attempt}: {detail}",
    )
    if row is None:
        return None
    if row["lost_attempts"] < rules.run_max_attempts:
        metrics.RUNS_REQUEUED.labels(reason).inc()
        log.warning("run.requeued", run_id=run_id, job_id=row["job_id"], reason=reason,
                    detail=detail, attempt=row["attempt"], lost_attempts=row["lost_attempts"])
        return "requeued"
    error = (
        f"no result after {row['lost_attempts']} attempts without one; the last: {detail}"
    )
    await conn.execute(
        """
        UPDATE runs SET status = 'failure', source_problem = 'worker_lost', error = $2,
               finished_at = now()
        WHERE id = $1
        """,
        run_id, error,
    )
    log.error("run.failed", run_id=run_id, job_id=row["job_id"], problem="worker_lost",
              error=error)
    metrics.RUNS_SETTLED.labels("failure", "worker_lost").inc()
    if row["job_id"] is not None:
        await settle_job(conn, row["job_id"], rules.public_base_url)
    if row["set_id"] is not None:
        await settle_sets(conn, [row["set_id"]])
    return "failed"


async def expire_leases(pool: asyncpg.Pool, rules: Rules, *, limit: int = 500) -> int:
    """Release every open run whose lease has passed; returns how many."""
    rows = await pool.fetch(
        """
        SELECT id, attempt, worker, lease_until FROM runs
        WHERE status IS NULL AND lease_until < now() ORDER BY lease_until LIMIT $1
        """,
        limit,
    )
    released = 0
    for row in rows:
        detail = (
            f"worker {row['worker']} sent no heartbeat for {rules.run_lease_s:g} s "
            f"(lease expired {row['lease_until']:%Y-%m-%d %H:%M:%S} UTC)"
        )
        async with pool.acquire() as conn, conn.transaction():
            if await release(conn, row["id"], row["attempt"], reason="lost", detail=detail,
                             rules=rules):
                released += 1
    return released


async def sweep_unseen(pool: asyncpg.Pool, rules: Rules, *, seen_empty_at: datetime) -> int:
    """Release runs whose task vanished; call only when the `tasks` queue was just seen empty.

    ``seen_empty_at`` is the database's time taken *before* looking at the queue. A run queued
    before it, without a heartbeat, was not in the queue then: it was taken by a worker (whose
    heartbeat is on its way) or lost. It is marked; if it is still unannounced when the queue is
    again seen empty ``run_lease_s`` later, it is released. Returns how many were released.
    """
    rows = await pool.fetch(
        """
        SELECT id, attempt FROM runs
        WHERE status IS NULL AND queued_at IS NOT NULL AND lease_until IS NULL
          AND unseen_since < $1::timestamptz - $2::interval
        ORDER BY id LIMIT 500
        """,
        seen_empty_at, timedelta(seconds=rules.run_lease_s),
    )
    released = 0
    for row in rows:
        async with pool.acquire() as conn, conn.transaction():
            if await release(
                conn, row["id"], row["attempt"], reason="unseen",
                detail="its task was not in the queue and no worker announced it", rules=rules,
            ):
                released += 1
    await pool.execute(
        """
        UPDATE runs SET unseen_since = $1
        WHERE status IS NULL AND queued_at < $1 AND lease_until IS NULL AND unseen_since IS NULL
        """,
        seen_empty_at,
    )
    return released

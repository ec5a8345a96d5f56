"""Watching the system for people and for the autoscaler: worker states, run and queue gauges.

Worker states follow the Overseer's rule: *active* while heartbeats arrive, *inactive* after
``WORKER_INACTIVE_S`` without one, *offline* after ``WORKER_OFFLINE_S``; offline workers are
forgotten after ``WORKER_FORGET_S``. These states are for people (the workers page, alerts);
whether a *run* is lost is decided by its lease (``recovery.py``), not by them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import asyncpg

from shared import metrics
from shared.broker import Broker
from shared.config import Settings
from shared.logging import get_logger
from shared.topology import TOPOLOGY

log = get_logger(__name__)

WORKER_STATUSES = ("active", "inactive", "offline")


@dataclass(frozen=True)
class RunCounts:
    """Open runs by state (see :data:`shared.metrics.RUNS`)."""

    unqueued: int
    queued: int
    running: int
    retrying: int

    @property
    def in_flight(self) -> int:
        """Queued or running: what the worker pool should be sized for."""
        return self.queued + self.running


async def update_worker_states(pool: asyncpg.Pool, settings: Settings) -> dict[str, int]:
    """Move workers between active, inactive and offline; forget long-offline ones.

    Returns the number of workers in each state.
    """
    inactive = timedelta(seconds=settings.worker_inactive_s)
    offline = timedelta(seconds=settings.worker_offline_s)
    async with pool.acquire() as conn, conn.transaction():
        changed = await conn.fetch(
            """
            UPDATE workers SET status = new.status
            FROM (
                SELECT name, CASE WHEN last_seen_at < now() - $2::interval THEN 'offline'
                                  WHEN last_seen_at < now() - $1::interval THEN 'inactive'
                                  ELSE 'active' END AS status
                FROM workers
            ) AS new
            WHERE workers.name = new.name AND workers.status <> new.status
            RETURNING workers.name, workers.status, workers.last_seen_at
            """,
            inactive, offline,
        )
        forgotten = await conn.fetchval(
            """
            WITH gone AS (
                DELETE FROM workers WHERE status = 'offline' AND last_seen_at < now() - $1::interval
                RETURNING 1
            ) SELECT count(*) FROM gone
            """,
            timedelta(seconds=settings.worker_forget_s),
        )
        rows = await conn.fetch("SELECT status, count(*) AS n FROM workers GROUP BY status")
    for row in changed:
        log.info(f"worker.{row['status']}", worker=row["name"],
                 last_seen_at=row["last_seen_at"].isoformat())
    if forgotten:
        log.info("workers.forgotten", workers=forgotten)
    counts = {status: 0 for status in WORKER_STATUSES}
    counts.update({row["status"]: int(row["n"]) for row in rows})
    for status, number in counts.items():
        metrics.WORKERS.labels(status).set(number)
    return counts


async def count_runs(pool: asyncpg.Pool) -> RunCounts:
    """Open runs by state, straight from PostgreSQL."""
    row = await pool.fetchrow(
        """
        SELECT count(*) FILTER (WHERE queued_at IS NULL
                                  AND (retry_at IS NULL OR retry_at <= now())) AS unqueued,
               count(*) FILTER (WHERE queued_at IS NULL AND retry_at > now())   AS retrying,
               count(*) FILTER (WHERE queued_at IS NOT NULL AND lease_until IS NULL) AS queued,
               count(*) FILTER (WHERE queued_at IS NOT NULL
                                  AND lease_until IS NOT NULL)                  AS running
        FROM runs WHERE status IS NULL
        """
    )
    assert row is not None
    return RunCounts(int(row["unqueued"]), int(row["queued"]), int(row["running"]),
                     int(row["retrying"]))


async def refresh_gauges(pool: asyncpg.Pool, broker: Broker) -> RunCounts:
    """Set the run, outbox and queue gauges; returns the run counts."""
    runs = await count_runs(pool)
    for state in ("unqueued", "queued", "running", "retrying"):
        metrics.RUNS.labels(state).set(getattr(runs, state))
    metrics.RUNS_IN_FLIGHT.set(runs.in_flight)
    outbox = await pool.fetchrow(
        """
        SELECT count(*) AS backlog,
               coalesce(extract(epoch FROM now() - min(created_at)), 0) AS oldest_s
        FROM statuses WHERE posted_at IS NULL AND given_up_at IS NULL
        """
    )
    assert outbox is not None
    metrics.OUTBOX_BACKLOG.set(int(outbox["backlog"]))
    metrics.OUTBOX_OLDEST_AGE.set(float(outbox["oldest_s"]))
    for queue in TOPOLOGY:
        ready, _consumers = await broker.queue_depth(queue)
        metrics.QUEUE_READY.labels(queue).set(ready)
    return runs

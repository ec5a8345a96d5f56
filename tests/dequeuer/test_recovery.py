"""Giving lost work back, in SQL: leases, hand-backs, vanished tasks, transient retries."""

from __future__ import annotations

from datetime import timedelta

import asyncpg

from services.dequeuer.recovery import Rules, expire_leases, release, sweep_unseen
from services.dequeuer.settle import record_heartbeat, record_returned, settle_done
from services.dequeuer.watch import count_runs, update_worker_states
from shared.config import Settings
from shared.messages import Done, Heartbeat, Returned, utcnow

BASE = "http://oa.example.org"
RULES = Rules(public_base_url=BASE, run_lease_s=60, run_max_attempts=3,
              run_retry_delay_s=3600, run_retry_max=2)


async def open_run(pool: asyncpg.Pool, **columns: object) -> tuple[int, int]:
    job_id = await pool.fetchval(
        "INSERT INTO jobs (delivery_id, event, repo, sha, ref) VALUES "
        "(gen_random_uuid()::text, 'push', 'o/r', $1, 'refs/heads/main') RETURNING id", "c" * 40)
    run_id = await pool.fetchval(
        "INSERT INTO runs (job_id, source_path, layer, entry_name, queued_at) VALUES "
        "($1, 'sources/us/ks/a.json', 'addresses', 'county', now()) RETURNING id", job_id)
    for name, value in columns.items():
        await pool.execute(f"UPDATE runs SET {name} = $2 WHERE id = $1", run_id, value)
    return job_id, run_id


async def run_row(pool: asyncpg.Pool, run_id: int) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT * FROM runs WHERE id = $1", run_id)
    assert row is not None
    return row


async def test_release_requeues_with_the_next_attempt_until_the_last(
    db_pool: asyncpg.Pool,
) -> None:
    job_id, run_id = await open_run(db_pool, lease_until=utcnow(), worker="w-1")
    for attempt in (1, 2):
        async with db_pool.acquire() as conn, conn.transaction():
            action = await release(conn, run_id, attempt, reason="lost", detail="gone",
                                   rules=RULES)
        assert action == "requeued"
        run = await run_row(db_pool, run_id)
        assert (run["attempt"], run["lost_attempts"], run["status"]) == (attempt + 1, attempt,
                                                                        None)
        assert run["queued_at"] is None and run["lease_until"] is None
        assert run["error"] == f"attempt {attempt}: gone"
    # A stale release (an attempt that is no longer current) changes nothing.
    async with db_pool.acquire() as conn, conn.transaction():
        assert await release(conn, run_id, 1, reason="lost", detail="late", rules=RULES) is None
    async with db_pool.acquire() as conn, conn.transaction():
        action = await release(conn, run_id, 3, reason="returned", detail="handed back",
                               rules=RULES)
    assert action == "failed"
    run = await run_row(db_pool, run_id)
    assert (run["status"], run["source_problem"]) == ("failure", "worker_lost")
    assert run["error"] == "no result after 3 attempts without one; the last: handed back"
    assert await db_pool.fetchval("SELECT status FROM jobs WHERE id = $1", job_id) == "failure"
    assert [r["state"] for r in await db_pool.fetch("SELECT state FROM statuses")] == ["failure"]


async def test_expired_leases_are_released_and_live_ones_kept(db_pool: asyncpg.Pool) -> None:
    _, expired = await open_run(db_pool, lease_until=utcnow() - timedelta(seconds=1),
                                worker="w-dead")
    _, alive = await open_run(db_pool, lease_until=utcnow() + timedelta(minutes=1))
    _, settled = await open_run(db_pool, lease_until=utcnow() - timedelta(minutes=1),
                                status="success")
    assert await expire_leases(db_pool, RULES) == 1
    run = await run_row(db_pool, expired)
    assert (run["attempt"], run["lost_attempts"], run["queued_at"]) == (2, 1, None)
    assert "worker w-dead sent no heartbeat for 60 s" in run["error"]
    assert (await run_row(db_pool, alive))["attempt"] == 1
    assert (await run_row(db_pool, settled))["attempt"] == 1
    assert await expire_leases(db_pool, RULES) == 0


async def test_a_heartbeat_renews_only_the_current_attempt(db_pool: asyncpg.Pool) -> None:
    _, run_id = await open_run(db_pool, attempt=2)
    stale = Heartbeat(worker="old", hostname="h", pid=1, run_id=run_id, attempt=1,
                      state="running")
    await record_heartbeat(db_pool, stale, RULES)
    run = await run_row(db_pool, run_id)
    assert run["lease_until"] is None and run["worker"] is None
    current = Heartbeat(worker="new", hostname="h", pid=2, run_id=run_id, attempt=2,
                        state="running", deadline_at=utcnow() + timedelta(hours=1))
    await record_heartbeat(db_pool, current, RULES)
    run = await run_row(db_pool, run_id)
    assert run["worker"] == "new"
    now = await db_pool.fetchval("SELECT now()")
    assert timedelta(seconds=55) < run["lease_until"] - now <= timedelta(seconds=60)


async def test_a_vanished_task_is_released_after_two_sightings_of_an_empty_queue(
    db_pool: asyncpg.Pool,
) -> None:
    _, lost = await open_run(db_pool)
    _, announced = await open_run(db_pool)
    _, unqueued = await open_run(db_pool, queued_at=None)
    first_look = await db_pool.fetchval("SELECT now()")
    assert await sweep_unseen(db_pool, RULES, seen_empty_at=first_look) == 0
    assert (await run_row(db_pool, lost))["unseen_since"] == first_look
    assert (await run_row(db_pool, unqueued))["unseen_since"] is None
    # One of them was taken after all: its heartbeat clears the mark.
    await record_heartbeat(db_pool, Heartbeat(worker="w", hostname="h", pid=1, run_id=announced,
                                              attempt=1, state="running"), RULES)
    assert (await run_row(db_pool, announced))["unseen_since"] is None
    # Seen empty again within the lease: too soon.
    assert await sweep_unseen(db_pool, RULES, seen_empty_at=first_look + timedelta(seconds=30)) == 0
    # And once more, a whole lease after the first sighting: released.
    later = first_look + timedelta(seconds=61)
    assert await sweep_unseen(db_pool, RULES, seen_empty_at=later) == 1
    run = await run_row(db_pool, lost)
    assert (run["attempt"], run["lost_attempts"], run["queued_at"]) == (2, 1, None)
    assert "no worker announced it" in run["error"]
    assert (await run_row(db_pool, announced))["attempt"] == 1


async def test_a_transient_failure_is_tried_again_later_then_fails_saying_so(
    db_pool: asyncpg.Pool,
) -> None:
    job_id, run_id = await open_run(db_pool, lease_until=utcnow() + timedelta(minutes=1))

    def failed(attempt: int) -> Done:
        return Done(run_id=run_id, attempt=attempt, worker="w", status="failure",
                    source_problem="download_failed", retryable=True,
                    error="download failed after 3 tries, http://x/a.csv: HTTP 503")

    for attempt in (1, 2):
        outcome = await settle_done(db_pool, failed(attempt), RULES)
        assert outcome.action == "retry"
        run = await run_row(db_pool, run_id)
        assert (run["status"], run["attempt"], run["retries"]) == (None, attempt + 1, attempt)
        assert run["queued_at"] is None and run["lease_until"] is None
        now = await db_pool.fetchval("SELECT now()")
        assert timedelta(minutes=59) < run["retry_at"] - now <= timedelta(hours=1)
        assert run["error"].startswith("will be tried again: download failed")
        counts = await count_runs(db_pool)
        assert (counts.retrying, counts.unqueued) == (1, 0)
        assert await db_pool.fetchval("SELECT status FROM jobs WHERE id = $1", job_id) is None
    outcome = await settle_done(db_pool, failed(3), RULES)
    assert outcome.action == "settled"
    run = await run_row(db_pool, run_id)
    assert (run["status"], run["source_problem"]) == ("failure", "download_failed")
    assert run["error"].endswith("HTTP 503 (the whole run was tried 3 times)")
    assert await db_pool.fetchval("SELECT status FROM jobs WHERE id = $1", job_id) == "failure"


async def test_a_permanent_failure_fails_at_once(db_pool: asyncpg.Pool) -> None:
    _, run_id = await open_run(db_pool)
    outcome = await settle_done(db_pool, Done(
        run_id=run_id, worker="w", status="failure", source_problem="download_failed",
        error="HTTP 404", retryable=False), RULES)
    assert outcome.action == "settled"
    assert (await run_row(db_pool, run_id))["retries"] == 0


async def test_a_hand_back_queues_the_next_attempt(db_pool: asyncpg.Pool) -> None:
    _, run_id = await open_run(db_pool, lease_until=utcnow() + timedelta(minutes=1))
    returned = Returned(run_id=run_id, attempt=1, worker="w-1", reason="SIGTERM")
    assert await record_returned(db_pool, returned, RULES) is True
    run = await run_row(db_pool, run_id)
    assert (run["attempt"], run["lost_attempts"], run["queued_at"]) == (2, 1, None)
    assert "worker w-1 handed it back (SIGTERM)" in run["error"]
    # The same hand-back again is for an attempt that is over: nothing happens.
    assert await record_returned(db_pool, returned, RULES) is False
    assert (await run_row(db_pool, run_id))["attempt"] == 2


async def test_worker_states_follow_their_heartbeats_and_old_ones_are_forgotten(
    db_pool: asyncpg.Pool, settings: Settings,
) -> None:
    for name, minutes in (("fresh", 1), ("quiet", 15), ("gone", 30), ("ancient", 60 * 24 * 8)):
        await db_pool.execute(
            "INSERT INTO workers (name, hostname, pid, last_seen_at) "
            "VALUES ($1, 'h', 1, now() - $2::interval)", name, timedelta(minutes=minutes))
    counts = await update_worker_states(db_pool, settings)
    assert counts == {"active": 1, "inactive": 1, "offline": 1}
    rows = await db_pool.fetch("SELECT name, status FROM workers ORDER BY name")
    assert {row["name"]: row["status"] for row in rows} == {
        "fresh": "active", "quiet": "inactive", "gone": "offline"}
    # A heartbeat brings a worker back to active.
    await record_heartbeat(db_pool, Heartbeat(worker="gone", hostname="h", pid=1), RULES)
    assert await db_pool.fetchval("SELECT status FROM workers WHERE name = 'gone'") == "active"

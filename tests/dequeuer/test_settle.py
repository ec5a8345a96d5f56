"""Settling runs and jobs in SQL: duplicates, late messages, heartbeats, deadlines, races."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg

from services.dequeuer.batch import DoneBatcher
from services.dequeuer.recovery import Rules
from services.dequeuer.settle import (
    overdue_runs,
    record_heartbeat,
    settle_done,
    settle_done_batch,
    settle_due,
)
from shared.messages import Done, Due, Heartbeat, utcnow

BASE = "http://oa.example.org"
RULES = Rules(public_base_url=BASE)
SHA = "c" * 40


async def make_job(pool: asyncpg.Pool, runs: int = 1) -> tuple[int, list[int]]:
    job_id = await pool.fetchval(
        "INSERT INTO jobs (delivery_id, event, repo, sha, ref) "
        "VALUES (gen_random_uuid()::text, 'push', 'o/r', $1, 'refs/heads/main') RETURNING id",
        SHA,
    )
    run_ids = [
        await pool.fetchval(
            "INSERT INTO runs (job_id, source_path, layer, entry_name) "
            "VALUES ($1, $2, 'addresses', 'county') RETURNING id",
            job_id, f"sources/us/ks/s{index}.json",
        )
        for index in range(runs)
    ]
    return job_id, run_ids


def done(run_id: int, status: str = "success", **extra: object) -> Done:
    return Done(run_id=run_id, worker="w-1", status=status, **extra)


async def test_done_settles_the_run_and_the_job(db_pool: asyncpg.Pool) -> None:
    job_id, (run_id,) = await make_job(db_pool)
    message = done(run_id, outputs={"out.csv": f"runs/{run_id}/out.csv"},
                   state={"fingerprint": "f1", "etag": '"e"', "last modified": "Mon"})
    assert (await settle_done(db_pool, message, RULES)).action == "settled"
    run = await db_pool.fetchrow("SELECT * FROM runs WHERE id = $1", run_id)
    assert run["status"] == "success"
    assert run["outputs"] == {"out.csv": f"runs/{run_id}/out.csv"}
    assert (run["fingerprint"], run["etag"], run["last_modified"]) == ("f1", '"e"', "Mon")
    assert run["worker"] == "w-1" and run["finished_at"] is not None
    assert run["started_at"] is not None
    job = await db_pool.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
    assert job["status"] == "success"
    statuses = await db_pool.fetch("SELECT * FROM statuses")
    assert [(s["state"], s["description"], s["target_url"]) for s in statuses] == [
        ("success", "All 1 run succeeded", f"{BASE}/jobs/{job_id}")
    ]


async def test_duplicate_done_changes_nothing(db_pool: asyncpg.Pool) -> None:
    _, (run_id,) = await make_job(db_pool)
    assert (await settle_done(db_pool, done(run_id, "success"), RULES)).action == "settled"
    before = dict(await db_pool.fetchrow("SELECT * FROM runs WHERE id = $1", run_id))
    statuses_before = await db_pool.fetchval("SELECT count(*) FROM statuses")

    # The same message again, and a contradicting one: both change nothing.
    assert (await settle_done(db_pool, done(run_id, "success"), RULES)).action == "ignored"
    assert (await settle_done(
        db_pool, done(run_id, "failure", source_problem="conform_failed", error="late"), RULES
    )).action == "ignored"
    assert dict(await db_pool.fetchrow("SELECT * FROM runs WHERE id = $1", run_id)) == before
    assert await db_pool.fetchval("SELECT count(*) FROM statuses") == statuses_before == 1


async def test_due_after_done_changes_nothing(db_pool: asyncpg.Pool) -> None:
    job_id, (run_id,) = await make_job(db_pool)
    await db_pool.execute(
        "UPDATE runs SET deadline_at = now() - interval '1 minute' WHERE id = $1", run_id)
    assert (await settle_done(db_pool, done(run_id), RULES)).action == "settled"
    before = dict(await db_pool.fetchrow("SELECT * FROM runs WHERE id = $1", run_id))
    due = Due(run_id=run_id, deadline_at=before["deadline_at"])
    assert await settle_due(db_pool, due, BASE) is False
    assert dict(await db_pool.fetchrow("SELECT * FROM runs WHERE id = $1", run_id)) == before
    assert await db_pool.fetchval("SELECT status FROM jobs WHERE id = $1", job_id) == "success"
    assert await db_pool.fetchval("SELECT count(*) FROM statuses") == 1


async def test_due_before_the_deadline_does_nothing(db_pool: asyncpg.Pool) -> None:
    job_id, (run_id,) = await make_job(db_pool)
    deadline = utcnow() + timedelta(hours=1)
    await db_pool.execute("UPDATE runs SET deadline_at = $2 WHERE id = $1", run_id, deadline)
    assert await settle_due(db_pool, Due(run_id=run_id, deadline_at=deadline), BASE) is False
    # Without any deadline (never started) a `due` does nothing either.
    _, (unstarted,) = await make_job(db_pool)
    assert await settle_due(db_pool, Due(run_id=unstarted, deadline_at=utcnow()), BASE) is False
    assert await db_pool.fetchval("SELECT count(*) FROM runs WHERE status IS NOT NULL") == 0
    assert await db_pool.fetchval("SELECT status FROM jobs WHERE id = $1", job_id) is None
    assert await db_pool.fetchval("SELECT count(*) FROM statuses") == 0


async def test_due_after_the_deadline_fails_the_run_and_a_late_done_changes_nothing(
    db_pool: asyncpg.Pool,
) -> None:
    job_id, (run_id,) = await make_job(db_pool)
    deadline = utcnow() - timedelta(seconds=1)
    await db_pool.execute("UPDATE runs SET deadline_at = $2 WHERE id = $1", run_id, deadline)
    assert await settle_due(db_pool, Due(run_id=run_id, deadline_at=deadline), BASE) is True
    run = await db_pool.fetchrow("SELECT * FROM runs WHERE id = $1", run_id)
    assert (run["status"], run["source_problem"]) == ("failure", "timeout")
    assert "before the deadline" in run["error"]
    assert await db_pool.fetchval("SELECT status FROM jobs WHERE id = $1", job_id) == "failure"
    assert (await settle_done(db_pool, done(run_id), RULES)).action == "ignored"
    assert await db_pool.fetchval("SELECT status FROM runs WHERE id = $1", run_id) == "failure"
    assert [r["state"] for r in await db_pool.fetch("SELECT state FROM statuses")] == ["failure"]


async def test_heartbeat_upserts_the_worker_and_starts_the_run(db_pool: asyncpg.Pool) -> None:
    _, (run_id,) = await make_job(db_pool)
    idle = Heartbeat(worker="w-1", hostname="host-a", pid=11)
    await record_heartbeat(db_pool, idle, RULES)
    worker = await db_pool.fetchrow("SELECT * FROM workers WHERE name = 'w-1'")
    assert (worker["hostname"], worker["pid"], worker["state"], worker["run_id"]) == (
        "host-a", 11, "idle", None)

    deadline = utcnow() + timedelta(hours=2)
    first = Heartbeat(worker="w-1", hostname="host-b", pid=12, run_id=run_id, attempt=1,
                      deadline_at=deadline, state="running")
    await record_heartbeat(db_pool, first, RULES)
    assert await db_pool.fetchval("SELECT count(*) FROM workers") == 1
    worker = await db_pool.fetchrow("SELECT * FROM workers WHERE name = 'w-1'")
    assert (worker["hostname"], worker["pid"], worker["state"], worker["run_id"]) == (
        "host-b", 12, "running", run_id)
    assert worker["last_seen_at"] == first.sent_at
    run = await db_pool.fetchrow("SELECT * FROM runs WHERE id = $1", run_id)
    assert run["worker"] == "w-1"
    assert run["started_at"] == first.sent_at
    assert run["deadline_at"] == deadline

    # A later beat without a deadline keeps the start and the deadline.
    later = Heartbeat(worker="w-1", hostname="host-b", pid=12, run_id=run_id, state="running",
                      sent_at=first.sent_at + timedelta(seconds=30))
    await record_heartbeat(db_pool, later, RULES)
    run = await db_pool.fetchrow("SELECT * FROM runs WHERE id = $1", run_id)
    assert (run["started_at"], run["deadline_at"]) == (first.sent_at, deadline)
    assert await db_pool.fetchval("SELECT last_seen_at FROM workers") == later.sent_at

    # A beat that arrives late (older than the last) does not move last_seen_at back.
    stale = Heartbeat(worker="w-1", hostname="host-b", pid=12, sent_at=first.sent_at)
    await record_heartbeat(db_pool, stale, RULES)
    assert await db_pool.fetchval("SELECT last_seen_at FROM workers") == later.sent_at


async def test_heartbeat_for_a_finished_run_leaves_it_alone(db_pool: asyncpg.Pool) -> None:
    _, (run_id,) = await make_job(db_pool)
    await settle_done(db_pool, done(run_id), RULES)
    before = dict(await db_pool.fetchrow("SELECT * FROM runs WHERE id = $1", run_id))
    await record_heartbeat(db_pool, Heartbeat(
        worker="w-2", hostname="h", pid=1, run_id=run_id, state="running",
        deadline_at=utcnow() + timedelta(hours=1)), RULES)
    assert dict(await db_pool.fetchrow("SELECT * FROM runs WHERE id = $1", run_id)) == before


async def test_overdue_runs_lists_open_runs_past_their_deadline(db_pool: asyncpg.Pool) -> None:
    _, run_ids = await make_job(db_pool, runs=4)
    past, future, settled, unstarted = run_ids
    await db_pool.execute(
        "UPDATE runs SET deadline_at = now() - interval '5 minutes', attempt = 2 WHERE id = $1",
        past)
    await db_pool.execute(
        "UPDATE runs SET deadline_at = now() + interval '5 minutes' WHERE id = $1", future)
    await db_pool.execute(
        "UPDATE runs SET deadline_at = now() - interval '5 minutes', status = 'success' "
        "WHERE id = $1", settled)
    due = await overdue_runs(db_pool)
    assert [(d.run_id, d.attempt) for d in due] == [(past, 2)]
    assert unstarted not in [d.run_id for d in due]
    assert await settle_due(db_pool, due[0], BASE) is True
    assert await overdue_runs(db_pool) == []


async def test_job_stays_open_until_its_last_run(db_pool: asyncpg.Pool) -> None:
    job_id, (first, second) = await make_job(db_pool, runs=2)
    assert (await settle_done(db_pool, done(first, "skipped"), RULES)).action == "settled"
    assert await db_pool.fetchval("SELECT status FROM jobs WHERE id = $1", job_id) is None
    assert await db_pool.fetchval("SELECT count(*) FROM statuses") == 0
    failed = done(second, "failure", source_problem="download_failed")
    assert (await settle_done(db_pool, failed, RULES)).action == "settled"
    assert await db_pool.fetchval("SELECT status FROM jobs WHERE id = $1", job_id) == "failure"
    assert [tuple(r) for r in await db_pool.fetch("SELECT state, description FROM statuses")] == [
        ("failure", "Failed: us/ks/s1 (download_failed)")
    ]


async def test_two_racing_settles_of_the_last_runs_settle_the_job_exactly_once(
    db_pool: asyncpg.Pool,
) -> None:
    for _ in range(10):  # the interleaving differs from round to round
        job_id, (first, second) = await make_job(db_pool, runs=2)
        results = await asyncio.gather(
            settle_done(db_pool, done(first), RULES), settle_done(db_pool, done(second), RULES))
        assert [result.action for result in results] == ["settled", "settled"]
        assert await db_pool.fetchval("SELECT status FROM jobs WHERE id = $1", job_id) == (
            "success"), "neither settle saw the job's last run final"
        assert await db_pool.fetchval(
            "SELECT count(*) FROM statuses WHERE job_id = $1", job_id) == 1


async def test_a_batch_settles_each_run_once_with_duplicates_and_superseded_attempts(
    db_pool: asyncpg.Pool,
) -> None:
    job_id, (first, second, third) = await make_job(db_pool, runs=3)
    await db_pool.execute("UPDATE runs SET attempt = 2 WHERE id = $1", second)
    outcomes = await settle_done_batch(db_pool, [
        done(first, outputs={"out.csv": "a"}),
        done(first, "failure", source_problem="conform_failed", error="a second report"),
        done(second, "failure", source_problem="conform_failed", error="superseded"),
        done(second, attempt=2, outputs={"out.csv": "b"}),
        done(third, "failure", source_problem="download_failed", error="HTTP 503",
             retryable=True),
    ], RULES)
    assert [o.action for o in outcomes] == ["settled", "ignored", "ignored", "settled", "retry"]
    rows = {r["id"]: r for r in await db_pool.fetch("SELECT * FROM runs")}
    assert (rows[first]["status"], rows[first]["outputs"]) == ("success", {"out.csv": "a"})
    assert (rows[second]["status"], rows[second]["outputs"]) == ("success", {"out.csv": "b"})
    assert (rows[third]["status"], rows[third]["attempt"]) == (None, 2)
    # The job waits for its third run.
    assert await db_pool.fetchval("SELECT status FROM jobs WHERE id = $1", job_id) is None
    outcomes = await settle_done_batch(db_pool, [done(third, attempt=2)], RULES)
    assert [(o.action, o.job_finished) for o in outcomes] == [("settled", True)]
    assert [r["state"] for r in await db_pool.fetch("SELECT state FROM statuses")] == ["success"]


async def test_the_batcher_settles_a_bad_message_apart_and_keeps_what_postgresql_refuses(
    db_pool: asyncpg.Pool,
) -> None:
    _, (clean, with_nul) = await make_job(db_pool, runs=2)
    batcher = DoneBatcher(db_pool, RULES)
    try:
        results = await asyncio.gather(
            batcher.settle(done(clean)),
            # jsonb cannot hold \\u0000: the batch fails, then this one is stored without it.
            batcher.settle(done(with_nul, "failure", source_problem="conform_failed",
                                error="bad byte \x00 in a name",
                                state={"error": "bad byte \x00 in a name"})),
        )
    finally:
        await batcher.close()
    assert [r.action for r in results] == ["settled", "settled"]
    row = await db_pool.fetchrow("SELECT error, state FROM runs WHERE id = $1", with_nul)
    assert row["error"] == "bad byte  in a name"
    assert row["state"] == {"error": "bad byte  in a name"}

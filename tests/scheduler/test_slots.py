"""Slots of the schedule on the real PostgreSQL: each runs once, whoever leads, whatever fails;
and two real scheduler processes hand the schedule over when the leader dies."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from services.demo.github import GitHubStandIn
from services.scheduler.service import Scheduler
from shared.config import Settings
from shared.github import GitHub
from shared.storage import LocalStorage
from tests.support.processes import ServiceProcesses


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def scheduler(settings: Settings, pool: asyncpg.Pool, storage: LocalStorage,
              github: GitHub | None = None) -> Scheduler:
    return Scheduler(settings, pool=pool, storage=storage, github=github)


async def recorded(pool: asyncpg.Pool) -> dict[str, tuple[str | None, bool]]:
    rows = await pool.fetch("SELECT slot_id, outcome, finished_at FROM schedule_runs")
    return {row["slot_id"]: (row["outcome"], row["finished_at"] is not None) for row in rows}


async def test_first_slots_are_recorded_then_each_due_slot_runs_once(
    settings: Settings, db_pool: asyncpg.Pool, local_storage: LocalStorage
) -> None:
    settings = settings.model_copy(update={
        "schedule_batch": "off", "schedule_collections": "0 3 */2 * *",
        "schedule_clean_up": "0 5 * * 0",
    })
    one = scheduler(settings, db_pool, local_storage)
    # A new installation on Wednesday: the latest slots are only recorded, nothing runs.
    assert await one.keep_schedule(utc(2026, 12, 2, 10)) == [
        ("collections:2026-12-01T03:00:00+00:00", "skipped"),
        ("clean-up:2026-11-29T05:00:00+00:00", "skipped"),
    ]
    assert await one.keep_schedule(utc(2026, 12, 2, 10, 30)) == []
    # Sunday after 05:00: the clean-up runs (once, however often the leader looks); so does
    # the collections slot of the 5th (no good run yet: no zip).
    sunday = utc(2026, 12, 6, 5, 0, 10)
    assert await one.keep_schedule(sunday) == [
        ("collections:2026-12-05T03:00:00+00:00", "done"),
        ("clean-up:2026-12-06T05:00:00+00:00", "done"),
    ]
    assert await one.keep_schedule(utc(2026, 12, 6, 5, 0, 40)) == []
    # Another replica (after a failover) sees the same slots as run.
    other = scheduler(settings, db_pool, local_storage)
    assert await other.keep_schedule(utc(2026, 12, 6, 9)) == []
    row = await db_pool.fetchrow(
        "SELECT * FROM schedule_runs WHERE slot_id = 'clean-up:2026-12-06T05:00:00+00:00'")
    assert row["outcome"] == "done" and row["finished_at"] >= row["started_at"]
    assert "runs_purged 0" in row["detail"]
    collections = await db_pool.fetchval(
        "SELECT detail FROM schedule_runs WHERE slot_id = 'collections:2026-12-05T03:00:00+00:00'")
    assert collections == "0 zips, 0 bytes"


async def test_a_slot_its_leader_died_in_is_taken_again_without_making_a_second_set(
    settings: Settings, db_pool: asyncpg.Pool, local_storage: LocalStorage
) -> None:
    settings = settings.model_copy(update={
        "schedule_batch": "0 12 * * 5", "schedule_collections": "off",
        "schedule_clean_up": "0 5 * * 0",
    })
    batch_slot = "batch:2026-12-04T12:00:00+00:00"
    # The last leader claimed both slots and died: the set was made, its slot never finished;
    # the clean-up had already been interrupted three times.
    await db_pool.execute(
        """
        INSERT INTO schedule_runs (slot_id, entry, slot_at, tries) VALUES
            ('batch:2026-11-27T12:00:00+00:00', 'batch', '2026-11-27T12:00:00Z', 1),
            ($1, 'batch', '2026-12-04T12:00:00Z', 1),
            ('clean-up:2026-11-29T05:00:00+00:00', 'clean-up', '2026-11-29T05:00:00Z', 3)
        """, batch_slot)
    await db_pool.execute(
        "UPDATE schedule_runs SET finished_at = now(), outcome = 'done'"
        " WHERE slot_id = 'batch:2026-11-27T12:00:00+00:00'")
    set_id = await db_pool.fetchval(
        "INSERT INTO sets (kind, repo, sha, state, slot_id) VALUES"
        " ('weekly', 'o/s', repeat('a', 40), '{\"files\": 2}', $1) RETURNING id", batch_slot)
    await db_pool.execute(
        "INSERT INTO runs (set_id, source_path, layer, entry_name, source) VALUES"
        " ($1, 'sources/a.json', 'addresses', 'x', '{}'), ($1, 'sources/b.json', 'addresses',"
        " 'y', '{}')", set_id)

    keeper = scheduler(settings, db_pool, local_storage, github=None)
    keeper.github = GitHub.open("http://127.0.0.1:9", None)  # never asked: the set exists
    try:
        assert await keeper.keep_schedule(utc(2026, 12, 4, 13)) == [
            (batch_slot, "done"), ("clean-up:2026-11-29T05:00:00+00:00", "failed")]
    finally:
        await keeper.github.close()
    assert await db_pool.fetchval("SELECT count(*) FROM sets") == 1
    rows = {row["slot_id"]: row for row in await db_pool.fetch("SELECT * FROM schedule_runs")}
    assert rows[batch_slot]["tries"] == 2
    assert rows[batch_slot]["detail"] == f"set {set_id}: 2 runs, 0 files read"
    assert rows["clean-up:2026-11-29T05:00:00+00:00"]["detail"] == (
        "interrupted 3 times; not tried again")


async def test_a_failing_slot_is_recorded_as_failed_and_not_run_again(
    settings: Settings, db_pool: asyncpg.Pool, local_storage: LocalStorage
) -> None:
    settings = settings.model_copy(update={
        "schedule_batch": "0 12 * * 5", "schedule_collections": "off",
        "schedule_clean_up": "off", "sources_repository": "nobody/nothing",
    })
    stand_in = GitHubStandIn()  # serves no such repository: 404
    github = GitHub.open(await stand_in.start(), "token")
    try:
        keeper = scheduler(settings, db_pool, local_storage, github)
        await keeper.keep_schedule(utc(2026, 12, 1))
        assert await keeper.keep_schedule(utc(2026, 12, 4, 12, 1)) == [
            ("batch:2026-12-04T12:00:00+00:00", "failed")]
        assert await keeper.keep_schedule(utc(2026, 12, 4, 12, 2)) == []
    finally:
        await github.close()
        await stand_in.stop()
    detail = await db_pool.fetchval(
        "SELECT detail FROM schedule_runs WHERE slot_id = 'batch:2026-12-04T12:00:00+00:00'")
    assert "404" in detail and "nobody/nothing" in detail
    assert await db_pool.fetchval("SELECT count(*) FROM sets") == 0


def test_the_other_scheduler_takes_over_when_the_leader_dies_and_no_slot_runs_twice(
    settings: Settings, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    storage.mkdir()
    env = {
        "DATABASE_URL": settings.database_url, "AMQP_URL": settings.amqp_url,
        "STORAGE_URL": storage.as_uri(),
        # A clean-up slot every 2 s (seconds in a sixth field), looked for every 0.2 s.
        "SCHEDULE_BATCH": "off", "SCHEDULE_COLLECTIONS": "off",
        "SCHEDULE_CLEAN_UP": "* * * * * */2", "SCHEDULE_POLL_S": "0.2",
    }
    with ServiceProcesses(tmp_path / "logs") as procs:
        first = procs.start("scheduler-1", ["scheduler"], env)
        first.wait_for_event("scheduler.leading", timeout_s=30)
        second = procs.start("scheduler-2", ["scheduler"], env)
        second.wait_for_event("scheduler.waiting_for_leadership", timeout_s=30)
        # The leader runs slots; the other waits.
        first.wait_for_event("slot.done", timeout_s=30)
        first.wait_for_event("slot.done", timeout_s=30, since=first.events().index(
            first.events("slot.done")[0]) + 1)
        assert not second.events("scheduler.leading")
        first.kill()  # SIGKILL: no clean hand-over; PostgreSQL frees the lock with the socket
        second.wait_for_event("scheduler.leading", timeout_s=30)
        mark = second.event_count()
        second.wait_for_event("slot.done", timeout_s=30, since=mark)
        second.wait_for_event("slot.done", timeout_s=30, since=second.event_count())
        second.stop()
        started = Counter(
            event["slot"] for process in (first, second) for event in process.events("slot.started")
        )
        done_by_first = {event["slot"] for event in first.events("slot.done")}
        done_by_second = {event["slot"] for event in second.events("slot.done")}
    assert started and max(started.values()) == 1, started
    assert len(done_by_first) >= 2 and len(done_by_second) >= 2
    assert not done_by_first & done_by_second
    rows = asyncio.run(_slots(settings.database_url))
    # Every slot run was recorded once, done (or, for the one the kill cut short, left started).
    assert set(started) <= set(rows)
    assert {slot for slot, outcome in rows.items() if outcome == "done"} >= (
        done_by_first | done_by_second)


async def _slots(database_url: str) -> dict[str, str | None]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT slot_id, outcome FROM schedule_runs")
    finally:
        await conn.close()
    return {row["slot_id"]: row["outcome"] for row in rows}

"""The ``entries`` table of migration 0007, kept by triggers as runs finish: each published
entry's latest run and its latest good run (a success without a regression warning)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

T0 = datetime(2026, 11, 1, 12, tzinfo=UTC)
PATH = "sources/us/ks/lane.json"


async def _set(pool: asyncpg.Pool | asyncpg.Connection) -> int:
    return int(await pool.fetchval("INSERT INTO sets (kind) VALUES ('weekly') RETURNING id"))


async def _job(pool: asyncpg.Pool, event: str) -> int:
    return int(await pool.fetchval(
        "INSERT INTO jobs (event, repo, sha, pr_number) VALUES ($1, 'o/r', 'abc', $2) "
        "RETURNING id", event, 7 if event == "pull_request" else None))


async def _open(pool: asyncpg.Pool | asyncpg.Connection, *, set_id: int | None = None,
                job_id: int | None = None, entry: str = "county") -> int:
    return int(await pool.fetchval(
        "INSERT INTO runs (set_id, job_id, source_path, layer, entry_name) "
        "VALUES ($1, $2, $3, 'addresses', $4) RETURNING id", set_id, job_id, PATH, entry))


async def _finish(pool: asyncpg.Pool | asyncpg.Connection, run_id: int, status: str,
                  at: datetime, features: int | None = None) -> None:
    state = {"feature count": features, "address count": features} if features else {}
    await pool.execute(
        "UPDATE runs SET status = $2, finished_at = $3, state = $4 WHERE id = $1",
        run_id, status, at, state)


async def _entry(pool: asyncpg.Pool, entry: str = "county") -> dict[str, Any] | None:
    row = await pool.fetchrow(
        "SELECT run_id, status, finished_at, good_run_id, good_finished_at, features, addresses"
        " FROM entries WHERE source_path = $1 AND layer = 'addresses' AND entry_name = $2",
        PATH, entry)
    return dict(row) if row is not None else None


async def test_a_finished_run_becomes_its_entrys_latest(db_pool: asyncpg.Pool) -> None:
    set_id = await _set(db_pool)
    good = await _open(db_pool, set_id=set_id)
    assert await _entry(db_pool) is None  # open runs are not an entry's latest
    await _finish(db_pool, good, "success", T0, features=1200)
    assert await _entry(db_pool) == {
        "run_id": good, "status": "success", "finished_at": T0, "good_run_id": good,
        "good_finished_at": T0, "features": 1200, "addresses": 1200}

    failed = await _open(db_pool, set_id=await _set(db_pool))
    await _finish(db_pool, failed, "failure", T0 + timedelta(days=7))
    entry = await _entry(db_pool)
    assert entry is not None
    # The latest run failed; the latest good data is still the success's.
    assert (entry["run_id"], entry["status"]) == (failed, "failure")
    assert (entry["good_run_id"], entry["features"]) == (good, 1200)


async def test_runs_finishing_out_of_order(db_pool: asyncpg.Pool) -> None:
    older = await _open(db_pool, set_id=await _set(db_pool))
    newer = await _open(db_pool, set_id=await _set(db_pool))
    await _finish(db_pool, newer, "failure", T0 + timedelta(hours=2))
    # The older run finishes last but earlier (its finish time is from the worker): the newer
    # finish stays the entry's latest run; the older success is its good run (none newer).
    await _finish(db_pool, older, "success", T0 + timedelta(hours=1), features=50)
    entry = await _entry(db_pool)
    assert entry is not None
    assert (entry["run_id"], entry["good_run_id"], entry["features"]) == (newer, older, 50)

    # And a good run finished before the current good one does not replace it.
    best = await _open(db_pool, set_id=await _set(db_pool))
    await _finish(db_pool, best, "success", T0 + timedelta(hours=3), features=60)
    late = await _open(db_pool, set_id=await _set(db_pool))
    await _finish(db_pool, late, "success", T0 + timedelta(hours=2, minutes=30), features=70)
    entry = await _entry(db_pool)
    assert entry is not None
    assert (entry["run_id"], entry["good_run_id"], entry["features"]) == (best, best, 60)


async def test_a_warning_set_after_the_status_falls_back_to_the_previous_good_run(
    db_pool: asyncpg.Pool,
) -> None:
    first = await _open(db_pool, set_id=await _set(db_pool))
    await _finish(db_pool, first, "success", T0, features=1000)
    second = await _open(db_pool, set_id=await _set(db_pool))
    # As the dequeuer does it: the status, then the regression warning, in one transaction.
    async with db_pool.acquire() as conn, conn.transaction():
        await _finish(conn, second, "success", T0 + timedelta(days=7), features=10)
        await conn.execute("UPDATE runs SET warning = 'features fell by 99 %' WHERE id = $1",
                           second)
    entry = await _entry(db_pool)
    assert entry is not None
    assert (entry["run_id"], entry["status"]) == (second, "success")  # still the latest run
    assert (entry["good_run_id"], entry["good_finished_at"], entry["features"]) == \
        (first, T0, 1000)

    # A warning on a run that is not the entry's good run changes nothing.
    third = await _open(db_pool, set_id=await _set(db_pool))
    await _finish(db_pool, third, "success", T0 + timedelta(days=14), features=1100)
    await db_pool.execute("UPDATE runs SET warning = 'late' WHERE id = $1", first)
    entry = await _entry(db_pool)
    assert entry is not None and (entry["good_run_id"], entry["features"]) == (third, 1100)

    # With no earlier good run left, the entry has none.
    await db_pool.execute("UPDATE runs SET warning = 'x' WHERE id = $1", third)
    entry = await _entry(db_pool)
    assert entry is not None
    assert (entry["good_run_id"], entry["features"], entry["addresses"]) == (None, None, None)


async def test_only_published_runs_count(db_pool: asyncpg.Pool) -> None:
    pull = await _open(db_pool, job_id=await _job(db_pool, "pull_request"), entry="pr")
    await _finish(db_pool, pull, "success", T0, features=5)
    assert await _entry(db_pool, "pr") is None  # a pull request checks a change, unmerged

    push = await _open(db_pool, job_id=await _job(db_pool, "push"), entry="pushed")
    await _finish(db_pool, push, "success", T0, features=6)
    entry = await _entry(db_pool, "pushed")
    assert entry is not None and entry["good_run_id"] == push

    # A run inserted with its outcome already (a skipped entry) counts at once.
    skipped = int(await db_pool.fetchval(
        "INSERT INTO runs (set_id, source_path, layer, entry_name, status, finished_at) "
        "VALUES ($1, $2, 'addresses', 'skip', 'skipped', $3) RETURNING id",
        await _set(db_pool), PATH, T0))
    entry = await _entry(db_pool, "skip")
    assert entry is not None
    assert (entry["run_id"], entry["status"], entry["good_run_id"]) == (skipped, "skipped", None)


async def test_rebuilding_gives_what_the_triggers_kept(db_pool: asyncpg.Pool) -> None:
    """``site_rebuild_entries()`` (after a bulk load with the triggers off) agrees with them."""
    for day in range(6):
        for entry, status in (("a", "success"), ("b", "failure" if day % 2 else "success"),
                              ("c", "skipped")):
            run_id = await _open(db_pool, set_id=await _set(db_pool), entry=entry)
            await _finish(db_pool, run_id, status, T0 + timedelta(days=day, minutes=-day),
                          features=100 + day)
    warned = await db_pool.fetchval("SELECT max(id) FROM runs WHERE entry_name = 'a'")
    await db_pool.execute("UPDATE runs SET warning = 'w' WHERE id = $1", warned)
    pull = await _open(db_pool, job_id=await _job(db_pool, "pull_request"), entry="d")
    await _finish(db_pool, pull, "success", T0, features=1)

    kept = [dict(row) for row in await db_pool.fetch("SELECT * FROM entries ORDER BY 1, 2, 3")]
    await db_pool.execute("SELECT site_rebuild_entries()")
    rebuilt = [dict(row) for row in await db_pool.fetch("SELECT * FROM entries ORDER BY 1, 2, 3")]
    assert rebuilt == kept
    assert [row["entry_name"] for row in kept] == ["a", "b", "c"]

"""The clean-up against the real PostgreSQL and a real S3 API server (moto on loopback): what
the retention rules keep, what they purge, and that nothing a row still points at goes."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from services.scheduler.cleanup import clean_up
from shared.config import Settings
from shared.storage import S3Storage

ENTRY = ("sources/us/ks/lane_county.json", "addresses", "county")


def at(month: int, day: int) -> datetime:
    return datetime(2026, month, day, 12, tzinfo=UTC)


async def add_run(
    pool: asyncpg.Pool, storage: S3Storage, name: str, finished: datetime | None,
    status: str | None, *, warning: str | None = None, entry: tuple[str, str, str] = ENTRY,
    uses: int | None = None,
) -> int:
    """A run with its own files in storage (and, with ``uses``, an earlier run's out.csv)."""
    run_id = int(await pool.fetchval(
        """
        INSERT INTO runs (source_path, layer, entry_name, status, warning, started_at,
                          finished_at, state)
        VALUES ($1, $2, $3, $4, $5, $6, $6, $7) RETURNING id
        """,
        *entry, status, warning, finished, {"name": name}))
    outputs = {"index.json": f"runs/{run_id}/index.json", "log.txt": f"runs/{run_id}/log.txt"}
    if uses is not None:
        outputs["out.csv"] = f"runs/{uses}/out.csv"
    elif status == "success":
        outputs["out.csv"] = f"runs/{run_id}/out.csv"
    for key in outputs.values():
        if key.startswith(f"runs/{run_id}/"):
            await storage.put_bytes(key, name.encode())
    await pool.execute("UPDATE runs SET outputs = $2 WHERE id = $1", run_id, outputs)
    return run_id


async def test_retention_keeps_what_is_referenced_and_purges_the_rest(
    settings: Settings, db_pool: asyncpg.Pool, s3_storage: S3Storage
) -> None:
    runs: dict[str, int] = {}

    async def add(name: str, *args: object, **kwargs: object) -> None:
        runs[name] = await add_run(db_pool, s3_storage, name, *args, **kwargs)  # type: ignore[arg-type]

    # One entry, oldest first. January: one run, the month's last (kept for history).
    await add("jan", at(1, 10), "success")
    # February: the month's last is kept; the earlier one is not.
    await add("feb-early", at(2, 3), "success")
    await add("feb-late", at(2, 20), "failure")
    # March: the entry's latest good run, then runs that are no good data (skipped, warned,
    # failed): the last five of them are kept, the older ones and the warned one are not.
    await add("mar-good", at(3, 1), "success")
    await add("mar-skip", at(3, 2), "skipped")
    await add("mar-warned", at(3, 3), "success", warning="fewer than the last good run")
    for day in range(4, 10):
        await add(f"mar-{day}", at(3, day), "failure")
    # Another entry, whose latest run reused the outputs of an old run that is otherwise out
    # of the rules: that old run's files stay.
    other = ("sources/xx/y.json", "addresses", "z")
    await add("b-used", at(1, 5), "success", entry=other)
    await add("b-jan-late", at(1, 6), "failure", entry=other)
    for day in range(1, 5):
        await add(f"b-feb-{day}", at(2, day), "failure", entry=other)
    await add("b-reuser", at(2, 5), "success", entry=other, uses=runs["b-used"])
    # A run still open, whatever its age.
    await add("open", None, None)
    # Files of a run whose row is gone.
    await s3_storage.put_bytes("runs/999999/out.csv", b"orphan")
    await s3_storage.put_bytes("runs/999999/index.json", b"orphan")
    # Deliveries and statuses: old and done ones go; recent or unfinished ones stay.
    await db_pool.execute(
        """
        INSERT INTO deliveries (delivery_id, event, payload, received_at, processed_at) VALUES
            ('old', 'push', '{}', now() - interval '40 days', now() - interval '40 days'),
            ('old-unprocessed', 'push', '{}', now() - interval '40 days', NULL),
            ('recent', 'push', '{}', now() - interval '2 days', now() - interval '2 days')
        """)
    await db_pool.execute(
        """
        INSERT INTO statuses (repo, sha, state, description, created_at, posted_at) VALUES
            ('o/r', 'a', 'success', 'old', now() - interval '31 days', now()),
            ('o/r', 'b', 'pending', 'old, never sent', now() - interval '31 days', NULL),
            ('o/r', 'c', 'success', 'recent', now() - interval '1 day', now())
        """)
    purged_names = {"feb-early", "mar-skip", "mar-warned", "mar-4"}
    keys_before = set(await s3_storage.list_keys("runs/"))

    dry = await clean_up(db_pool, s3_storage, settings, dry_run=True)
    assert set(await s3_storage.list_keys("runs/")) == keys_before
    assert await db_pool.fetchval("SELECT count(*) FROM runs WHERE purged_at IS NOT NULL") == 0
    assert await db_pool.fetchval("SELECT count(*) FROM deliveries") == 3

    report = await clean_up(db_pool, s3_storage, settings)
    assert report.as_dict() == {**dry.as_dict(), "dry_run": False}
    purged = {row["id"] for row in await db_pool.fetch(
        "SELECT id FROM runs WHERE purged_at IS NOT NULL")}
    assert purged == {runs[name] for name in purged_names}
    # Index and log of each, and the out.csv of the two successes; the orphan's two files.
    assert (report.runs_purged, report.objects_deleted, report.orphans_deleted) == (4, 10, 2)
    assert (report.deliveries_deleted, report.statuses_deleted) == (1, 1)
    keys_after = set(await s3_storage.list_keys("runs/"))
    for name in purged_names:
        assert not {key for key in keys_after if key.startswith(f"runs/{runs[name]}/")}
    assert not {key for key in keys_after if key.startswith("runs/999999/")}
    # Every file a row still points at is there: no page links to a missing file.
    for row in await db_pool.fetch("SELECT id, outputs FROM runs WHERE purged_at IS NULL"):
        assert set(row["outputs"].values()) <= keys_after, row["id"]
    assert f"runs/{runs['b-used']}/out.csv" in keys_after  # reused by b-reuser
    rows = await db_pool.fetch("SELECT * FROM runs WHERE purged_at IS NOT NULL")
    assert all(row["outputs"] == {} and row["status"] is not None for row in rows)
    assert sorted(r["delivery_id"] for r in await db_pool.fetch(
        "SELECT delivery_id FROM deliveries")) == ["old-unprocessed", "recent"]
    assert sorted(r["description"] for r in await db_pool.fetch(
        "SELECT description FROM statuses")) == ["old, never sent", "recent"]

    # Once is enough: the next clean-up finds nothing more.
    again = await clean_up(db_pool, s3_storage, settings)
    assert (again.runs_purged, again.objects_deleted, again.orphans_deleted) == (0, 0, 0)


async def test_a_purged_runs_leftover_files_are_deleted_unless_another_run_uses_them(
    settings: Settings, db_pool: asyncpg.Pool, s3_storage: S3Storage
) -> None:
    # An interrupted clean-up marked runs purged but left files behind; one of them is still
    # reused by a kept run.
    left = await add_run(db_pool, s3_storage, "left", at(1, 1), "success")
    used = await add_run(db_pool, s3_storage, "used", at(1, 2), "success")
    await add_run(db_pool, s3_storage, "reuser", at(1, 3), "success", uses=used)
    await db_pool.execute("UPDATE runs SET purged_at = now() WHERE id = ANY($1::bigint[])",
                          [left, used])
    report = await clean_up(db_pool, s3_storage, settings)
    keys = set(await s3_storage.list_keys("runs/"))
    assert not {key for key in keys if key.startswith(f"runs/{left}/")}
    assert f"runs/{used}/out.csv" in keys
    assert report.orphans_deleted == 3

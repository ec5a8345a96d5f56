"""Clean-up: what storage and the database no longer need to keep.

Run outputs in storage (``runs/{id}/...``) are kept, for each entry, for

* its latest good run (successful, no regression warning), what downloads and reuse point at;
* its last ``RETENTION_RUNS`` runs (5), whatever their outcome;
* one run per calendar month beyond them (the month's last), for history;
* every open run, and every run whose files another kept run uses (a run that reused an
  earlier run's outputs lists that run's keys as its own).

The other runs are *purged*: their storage objects are deleted first, then the row is marked
(``purged_at``, ``outputs`` emptied), so no page ever links to a file that is gone; the row,
its outcome and its counts stay. Storage objects under ``runs/`` whose run no longer has a row,
or whose purged run's files were left behind by an interrupted clean-up, are deleted too.
Delivery payloads and sent outbox rows older than ``RETENTION_DAYS`` (30) are removed.

``dry_run`` reports what would go without touching anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta

import asyncpg

from shared.config import Settings
from shared.errors import NotFound
from shared.logging import get_logger
from shared.storage import Storage

log = get_logger(__name__)

_RUN_KEY = re.compile(r"^runs/(\d+)/")
#: Rows purged per transaction.
CHUNK = 500


@dataclass
class CleanUpReport:
    """What a clean-up removed (or, in a dry run, would remove)."""

    runs_purged: int = 0
    objects_deleted: int = 0
    orphans_deleted: int = 0
    deliveries_deleted: int = 0
    statuses_deleted: int = 0
    dry_run: bool = False
    examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "runs_purged": self.runs_purged, "objects_deleted": self.objects_deleted,
            "orphans_deleted": self.orphans_deleted,
            "deliveries_deleted": self.deliveries_deleted,
            "statuses_deleted": self.statuses_deleted, "dry_run": self.dry_run,
        }


async def clean_up(
    pool: asyncpg.Pool, storage: Storage, settings: Settings, *, dry_run: bool = False
) -> CleanUpReport:
    """Apply the retention rules of the module docstring; returns what it did."""
    report = CleanUpReport(dry_run=dry_run)
    candidates = await _purgeable(pool, settings.retention_runs)
    references = await _references(pool)
    # A run whose files a kept run uses is kept, and so are the runs *it* uses: to a fixed
    # point (references from runs being purged do not count).
    purge = set(candidates)
    while True:
        used = {target for source, target in references if source not in purge}
        if not purge & used:
            break
        purge -= used
    candidates = {run_id: outputs for run_id, outputs in candidates.items() if run_id in purge}
    used_elsewhere = used
    ordered = sorted(candidates.items())
    for start in range(0, len(ordered), CHUNK):
        chunk = ordered[start:start + CHUNK]
        for run_id, outputs in chunk:
            keys = set(outputs.values()) | set(await storage.list_keys(f"runs/{run_id}/"))
            # Only the run's own files: a reused run lists an earlier run's keys as well.
            own = sorted(key for key in keys if key.startswith(f"runs/{run_id}/"))
            if dry_run:
                if len(report.examples) < 20:
                    report.examples.append(f"run {run_id}: {len(own)} object(s)")
            else:
                for key in own:
                    await storage.delete(key)
            report.objects_deleted += len(own)
        if not dry_run:
            await pool.execute(
                """
                UPDATE runs SET purged_at = now(), outputs = '{}'
                WHERE id = ANY($1::bigint[]) AND purged_at IS NULL
                """,
                [run_id for run_id, _outputs in chunk],
            )
        report.runs_purged += len(chunk)
    report.orphans_deleted = await _orphans(pool, storage, used_elsewhere, dry_run=dry_run,
                                            examples=report.examples)
    horizon = timedelta(days=settings.retention_days)
    if dry_run:
        report.deliveries_deleted = int(await pool.fetchval(
            "SELECT count(*) FROM deliveries WHERE received_at < now() - $1::interval"
            " AND processed_at IS NOT NULL", horizon))
        report.statuses_deleted = int(await pool.fetchval(
            "SELECT count(*) FROM statuses WHERE created_at < now() - $1::interval"
            " AND (posted_at IS NOT NULL OR given_up_at IS NOT NULL)", horizon))
    else:
        report.deliveries_deleted = _count(await pool.execute(
            "DELETE FROM deliveries WHERE received_at < now() - $1::interval"
            " AND processed_at IS NOT NULL", horizon))
        report.statuses_deleted = _count(await pool.execute(
            "DELETE FROM statuses WHERE created_at < now() - $1::interval"
            " AND (posted_at IS NOT NULL OR given_up_at IS NOT NULL)", horizon))
    log.info("clean_up.done", **report.as_dict())
    return report


def _count(command_tag: str) -> int:
    # asyncpg returns "DELETE 12".
    return int(command_tag.rsplit(" ", 1)[-1]) if command_tag else 0


async def _references(pool: asyncpg.Pool) -> list[tuple[int, int]]:
    """``(run, earlier run)`` for each run (not purged) whose outputs include files of an
    earlier run: a run that reused an earlier run's outputs lists that run's keys."""
    rows = await pool.fetch(
        """
        SELECT DISTINCT r.id AS source,
               substring(e.value FROM '^runs/([0-9]+)/')::bigint AS target
        FROM runs AS r, jsonb_each_text(r.outputs) AS e(name, value)
        WHERE r.purged_at IS NULL AND e.value LIKE 'runs/%'
          AND e.value NOT LIKE 'runs/' || r.id || '/%'
        """
    )
    return [(int(row["source"]), int(row["target"])) for row in rows
            if row["target"] is not None]


async def _purgeable(pool: asyncpg.Pool, keep_last: int) -> dict[int, dict[str, str]]:
    """Settled, unpurged runs outside the retention rules, with their outputs."""
    rows = await pool.fetch(
        """
        WITH ranked AS (
            SELECT id, outputs, status, warning,
                   row_number() OVER (PARTITION BY source_path, layer, entry_name
                                      ORDER BY finished_at DESC, id DESC) AS recent,
                   row_number() OVER (PARTITION BY source_path, layer, entry_name,
                                                   date_trunc('month', finished_at)
                                      ORDER BY finished_at DESC, id DESC) AS in_month,
                   row_number() OVER (PARTITION BY source_path, layer, entry_name
                                      ORDER BY (status = 'success' AND warning IS NULL) DESC,
                                               finished_at DESC, id DESC) AS good
            FROM runs
            WHERE purged_at IS NULL AND status IS NOT NULL
        )
        SELECT id, outputs FROM ranked
        WHERE recent > $1 AND in_month > 1
          AND NOT (good = 1 AND status = 'success' AND warning IS NULL)
        ORDER BY id
        """,
        keep_last,
    )
    return {int(row["id"]): dict(row["outputs"] or {}) for row in rows}


async def _orphans(
    pool: asyncpg.Pool, storage: Storage, used_elsewhere: set[int], *, dry_run: bool,
    examples: list[str],
) -> int:
    """Delete objects under ``runs/`` of runs that have no row, or are purged and unused."""
    by_run: dict[int, list[str]] = {}
    for key in await storage.list_keys("runs/"):
        match = _RUN_KEY.match(key)
        if match:
            by_run.setdefault(int(match.group(1)), []).append(key)
    if not by_run:
        return 0
    rows = await pool.fetch(
        "SELECT id, purged_at IS NOT NULL AS purged FROM runs WHERE id = ANY($1::bigint[])",
        list(by_run),
    )
    known = {int(row["id"]): bool(row["purged"]) for row in rows}
    deleted = 0
    for run_id, keys in sorted(by_run.items()):
        gone = run_id not in known
        leftover = known.get(run_id, False) and run_id not in used_elsewhere
        if not (gone or leftover):
            continue
        for key in keys:
            if dry_run:
                if len(examples) < 20:
                    examples.append(f"orphan {key}")
            else:
                try:
                    await storage.delete(key)
                except NotFound:
                    pass
            deleted += 1
    return deleted

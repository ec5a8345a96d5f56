"""Runs counted by state, for sets and jobs (progress bars, summary lines, success rates)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import asyncpg

from services.webhook.views.cache import OPEN_SET_MAX_AGE_S, SiteCache
from services.webhook.views.models import STATE_OF_RANK, Tally
from services.webhook.views.sql import query

# Both read only the index on (set_id, rank) with its INCLUDE columns (migration 0007).
SET_TALLIES = query("tallies.sets", """
    SELECT set_id AS owner, site_run_rank(status, started_at) AS rank, count(*) AS runs
    FROM runs WHERE set_id = ANY($1::bigint[])
    GROUP BY 1, 2
""", "set_ids")
SET_PROBLEMS = query("tallies.set_problems", """
    SELECT source_problem, count(*) AS runs
    FROM runs WHERE set_id = $1 AND source_problem IS NOT NULL
    GROUP BY 1
""", "set_id")
JOB_TALLIES = query("tallies.jobs", """
    SELECT job_id AS owner, site_run_rank(status, started_at) AS rank, count(*) AS runs
    FROM runs WHERE job_id = ANY($1::bigint[])
    GROUP BY 1, 2
""", "job_ids")


def _tallies(rows: list[Any], owners: list[int]) -> dict[int, Tally]:
    counts: dict[int, dict[str, int]] = defaultdict(dict)
    for row in rows:
        counts[row["owner"]][STATE_OF_RANK[row["rank"]]] = row["runs"]
    return {owner: Tally.of(counts.get(owner, {})) for owner in owners}


async def job_tallies(db: asyncpg.Pool, job_ids: list[int]) -> dict[int, Tally]:
    if not job_ids:
        return {}
    return _tallies(await JOB_TALLIES.fetch(db, job_ids), job_ids)


def _stored(row: Any) -> dict[str, Any] | None:
    """The counts a finished set stored (``shared/sets.py``), when they hold what the site
    shows; sets finished before migration 0009 stored them without ``by_problem``."""
    counts = row["counts"]
    if row["finished_at"] is None or not counts or "by_problem" not in counts:
        return None
    return counts


def stored_tally(counts: dict[str, Any]) -> Tally:
    # A set finishes only when none of its runs is open, and its runs never reopen.
    failed, skipped = counts["failed"], counts["skipped"]
    return Tally(total=counts["runs"], success=counts["runs"] - failed - skipped,
                 failure=failed, skipped=skipped)


def by_problem(counts: dict[str, int]) -> dict[str, int]:
    """Problems most frequent first, then by code (jsonb keeps no key order)."""
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


async def set_tallies(
    db: asyncpg.Pool, cache: SiteCache, sets: list[Any]
) -> dict[int, Tally]:
    """Tallies of ``sets`` (rows with ``id``, ``finished_at`` and ``counts``): a finished set's
    from its stored counts, the others' from the cache when kept (``cache.py`` says for how
    long), or counted now."""
    found: dict[int, Tally] = {}
    wanted: list[int] = []
    for row in sets:
        stored = _stored(row)
        if stored is not None:
            found[row["id"]] = stored_tally(stored)
            continue
        kept = cache.set_tallies.get(row["id"])
        if kept is not None:
            found[row["id"]] = kept
        else:
            wanted.append(row["id"])
    if wanted:
        counted = _tallies(await SET_TALLIES.fetch(db, wanted), wanted)
        finished = {row["id"] for row in sets if row["finished_at"] is not None}
        for set_id, tally in counted.items():
            cache.set_tallies.keep(set_id, tally, _max_age(set_id in finished, tally))
        found.update(counted)
    return found


def _max_age(finished: bool, tally: Tally) -> float | None:
    # A finished set without open runs never changes again.
    return None if finished and tally.open == 0 else OPEN_SET_MAX_AGE_S


async def set_problems(
    db: asyncpg.Pool, cache: SiteCache, row: Any, tally: Tally
) -> dict[str, int]:
    """The failed and skipped runs of the set of ``row`` by problem: a finished set's stored,
    the others' kept as long as its ``tally``."""
    stored = _stored(row)
    if stored is not None:
        return by_problem(stored["by_problem"])
    set_id = row["id"]
    kept = cache.set_problems.get(set_id)
    if kept is None:
        kept = by_problem({found["source_problem"]: found["runs"]
                           for found in await SET_PROBLEMS.fetch(db, set_id)})
        cache.set_problems.keep(set_id, kept, _max_age(row["finished_at"] is not None, tally))
    return kept

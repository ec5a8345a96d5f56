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
    GROUP BY 1 ORDER BY 2 DESC, 1
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


async def set_tallies(
    db: asyncpg.Pool, cache: SiteCache, sets: list[Any]
) -> dict[int, Tally]:
    """Tallies of ``sets`` (rows with ``id`` and ``finished_at``): from the cache when kept
    (``cache.py`` says for how long), the others counted now."""
    found: dict[int, Tally] = {}
    wanted: list[int] = []
    for row in sets:
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
    # A finished set without open runs never changes again (a run requeued after the set
    # finished is open: then it is counted again like a set in progress).
    return None if finished and tally.open == 0 else OPEN_SET_MAX_AGE_S


async def set_problems(
    db: asyncpg.Pool, cache: SiteCache, set_id: int, tally: Tally, finished: bool
) -> dict[str, int]:
    """The set's failed and skipped runs by problem, kept as long as its ``tally``."""
    kept = cache.set_problems.get(set_id)
    if kept is None:
        kept = {row["source_problem"]: row["runs"] for row in await SET_PROBLEMS.fetch(db, set_id)}
        cache.set_problems.keep(set_id, kept, _max_age(finished, tally))
    return kept

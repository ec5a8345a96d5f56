"""Runs counted by state, for sets and jobs (progress bars, summary lines, success rates)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import asyncpg

from services.webhook.views.cache import SiteCache
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
    """Tallies of ``sets`` (rows with ``id`` and ``finished_at``): a finished set's from the
    cache once counted, the others' counted now."""
    found: dict[int, Tally] = {}
    wanted: list[int] = []
    for row in sets:
        kept = cache.finished_tally(row["id"]) if row["finished_at"] is not None else None
        if kept is not None:
            found[row["id"]] = kept
        else:
            wanted.append(row["id"])
    if wanted:
        counted = _tallies(await SET_TALLIES.fetch(db, wanted), wanted)
        finished = {row["id"] for row in sets if row["finished_at"] is not None}
        for set_id, tally in counted.items():
            if set_id in finished and tally.open == 0:
                cache.keep_tally(set_id, tally)
        found.update(counted)
    return found


async def set_problems(db: asyncpg.Pool, set_id: int) -> dict[str, int]:
    return {row["source_problem"]: row["runs"] for row in await SET_PROBLEMS.fetch(db, set_id)}

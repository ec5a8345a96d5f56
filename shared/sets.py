"""Batch sets in SQL: made by the scheduler (or ``oa-machine enqueue-sources``), finished here.

A set is over once every one of its runs is; the first transaction to see that (guarded by
``WHERE finished_at IS NULL``) stores its counts: ``runs``, ``succeeded`` (without a warning),
``failed`` and ``failed_by_problem``, ``skipped``, ``reused`` (outputs of an earlier run kept),
``warned`` (a regression warning), and ``by_problem``: every run with a problem code, failed or
skipped, by code (what the set's page lists; the results site reads a finished set's counts
from here instead of counting its thousands of runs). Call :func:`settle_sets` inside the
transaction that settles runs of sets, as :func:`shared.jobs.settle_jobs` for jobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from shared.logging import get_logger

log = get_logger(__name__)


async def settle_sets(conn: asyncpg.Connection, set_ids: Sequence[int]) -> list[int]:
    """Finish the sets of ``set_ids`` that have no open run left; returns those finished now."""
    finished: list[int] = []
    for set_id in sorted(set(set_ids)):
        # The open-run index answers this without counting the set's thousands of runs.
        if await conn.fetchval(
            "SELECT 1 FROM runs WHERE set_id = $1 AND status IS NULL LIMIT 1", set_id
        ):
            continue
        locked = await conn.fetchval(
            "SELECT id FROM sets WHERE id = $1 AND finished_at IS NULL FOR NO KEY UPDATE",
            set_id,
        )
        if locked is None:
            continue
        counts = await set_counts(conn, set_id)
        await conn.execute(
            "UPDATE sets SET status = 'done', finished_at = now(), counts = $2 WHERE id = $1",
            set_id, counts,
        )
        log.info("set.finished", set_id=set_id, **{k: v for k, v in counts.items()
                                                    if not isinstance(v, dict)})
        finished.append(set_id)
    return finished


async def set_counts(conn: asyncpg.Connection | asyncpg.Pool, set_id: int) -> dict[str, Any]:
    """The counts of a set's runs so far (what a finished set stores)."""
    row = await conn.fetchrow(
        """
        SELECT count(*) AS runs,
               count(*) FILTER (WHERE status = 'success' AND warning IS NULL) AS succeeded,
               count(*) FILTER (WHERE status = 'failure') AS failed,
               count(*) FILTER (WHERE status = 'skipped') AS skipped,
               count(*) FILTER (WHERE status IS NULL) AS open,
               count(*) FILTER (WHERE status = 'success'
                                  AND state ->> 'reused from' IS NOT NULL) AS reused,
               count(*) FILTER (WHERE warning IS NOT NULL) AS warned
        FROM runs WHERE set_id = $1
        """,
        set_id,
    )
    problems = await conn.fetch(
        """
        SELECT coalesce(source_problem, 'unknown') AS problem, count(*) AS n FROM runs
        WHERE set_id = $1 AND status = 'failure' GROUP BY 1 ORDER BY 2 DESC, 1
        """,
        set_id,
    )
    by_problem = await conn.fetch(
        """
        SELECT source_problem AS problem, count(*) AS n FROM runs
        WHERE set_id = $1 AND source_problem IS NOT NULL GROUP BY 1 ORDER BY 2 DESC, 1
        """,
        set_id,
    )
    assert row is not None
    counts: dict[str, Any] = {key: int(row[key]) for key in
                              ("runs", "succeeded", "failed", "skipped", "reused", "warned")}
    counts["failed_by_problem"] = {item["problem"]: int(item["n"]) for item in problems}
    counts["by_problem"] = {item["problem"]: int(item["n"]) for item in by_problem}
    if row["open"]:
        counts["open"] = int(row["open"])
    return counts

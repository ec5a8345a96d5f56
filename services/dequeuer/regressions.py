"""Regression warnings: a successful run whose counts fell sharply against the entry's last good
run is marked with a warning.

Counted: the features, and the features with a house number and with a street (the
``attribute counts`` of ``index.json``). A fall of ``REGRESSION_THRESHOLD`` (10 %) or more in
any of them gives the run a warning naming the fall: the run stays a success (its job and set
say "warned"), but the entry's latest good data stays the earlier run (downloads, reuse,
the next comparison), since a source that lost a third of its addresses upstream is more likely
broken than right.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

#: What is compared, as (label, how to read it from a run's state).
_MEASURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("features", ("feature count",)),
    ("numbers", ("attribute counts", "number")),
    ("streets", ("attribute counts", "street")),
)


def _read(state: Mapping[str, Any], path: tuple[str, ...]) -> int | None:
    value: Any = state
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def regression(
    previous: Mapping[str, Any], current: Mapping[str, Any], threshold: float
) -> str | None:
    """The warning for ``current`` against ``previous`` (two runs' states), or None."""
    falls = []
    for label, path in _MEASURES:
        before, now = _read(previous, path), _read(current, path)
        if before is None or now is None or before <= 0:
            continue
        fall = (before - now) / before
        if fall >= threshold:
            falls.append(f"{label} {before:,} → {now:,} (-{fall:.0%})")
    if not falls:
        return None
    return "fewer than the last good run: " + "; ".join(falls)


async def mark_regressions(
    conn: asyncpg.Connection, runs: Sequence[asyncpg.Record], threshold: float
) -> dict[int, str]:
    """Warn the successful ``runs`` (rows with id, source_path, layer, entry_name, state) whose
    counts fell against their entry's last good run; returns run id -> warning."""
    if not runs:
        return {}
    ids = [run["id"] for run in runs]
    earlier = await conn.fetch(
        """
        SELECT DISTINCT ON (r.source_path, r.layer, r.entry_name)
               r.source_path, r.layer, r.entry_name, r.state
        FROM runs AS r
        JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(path, layer, name)
          ON r.source_path = k.path AND r.layer = k.layer AND r.entry_name = k.name
        WHERE r.status = 'success' AND r.warning IS NULL AND r.id <> ALL($4::bigint[])
        ORDER BY r.source_path, r.layer, r.entry_name, r.finished_at DESC
        """,
        [run["source_path"] for run in runs], [run["layer"] for run in runs],
        [run["entry_name"] for run in runs], ids,
    )
    before = {(row["source_path"], row["layer"], row["entry_name"]): row["state"]
              for row in earlier}
    warnings: dict[int, str] = {}
    for run in runs:
        previous = before.get((run["source_path"], run["layer"], run["entry_name"]))
        if previous is None:
            continue
        warning = regression(previous, run["state"] or {}, threshold)
        if warning is not None:
            warnings[run["id"]] = warning
    if warnings:
        await conn.execute(
            """
            UPDATE runs AS r SET warning = w.text
            FROM unnest($1::bigint[], $2::text[]) AS w(id, text) WHERE r.id = w.id
            """,
            list(warnings), list(warnings.values()),
        )
    return warnings

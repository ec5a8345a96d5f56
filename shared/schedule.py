"""The schedule as data: what the scheduler does when, and which slot is due now.

Shared because the scheduler acts on it and the webhook shows it (``/api/schedule``).

Each entry has a cron expression in UTC (a setting; ``off`` turns it off). A *slot* is one
time an entry's expression names; its id (``batch:2026-12-04T12:00:00+00:00``) is the key of
``schedule_runs``, so a slot runs once however many schedulers restart or fail over.

The rule for what is due (pure, table-tested):

* the due slot of an entry is the latest one at or before now;
* it runs if it has not run yet, so a slot missed while no scheduler was up runs once on start,
  and only the latest missed one (not one per missed slot);
* an entry the scheduler has never run before only records its latest slot as ``skipped``
  (a new installation does not start a weekly set the moment it first starts).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from croniter import croniter

from shared.config import Settings

#: Entries of the schedule, in the order they are looked at.
ENTRIES = ("batch", "collections", "clean-up")


@dataclass(frozen=True)
class Entry:
    """One thing the scheduler does, and when (a cron expression in UTC, or None: off)."""

    name: str
    cron: str | None


@dataclass(frozen=True)
class Slot:
    """One time an entry is due."""

    entry: str
    at: datetime

    @property
    def slot_id(self) -> str:
        return f"{self.entry}:{self.at.isoformat()}"


def entries(settings: Settings) -> list[Entry]:
    """The schedule from the settings."""
    crons = {
        "batch": settings.schedule_batch,
        "collections": settings.schedule_collections,
        "clean-up": settings.schedule_clean_up,
    }
    return [Entry(name, None if crons[name] == "off" else crons[name]) for name in ENTRIES]


def latest_slot(entry: Entry, now: datetime) -> Slot | None:
    """The latest slot of ``entry`` at or before ``now`` (None when the entry is off)."""
    if entry.cron is None:
        return None
    # croniter's get_prev is strictly before its start: start a second later so that a slot
    # falling exactly on `now` counts as due. (Not croniter.match: it matches a whole minute,
    # which would name a new slot at every poll within it.)
    start = now.astimezone(UTC).replace(microsecond=0) + timedelta(seconds=1)
    prev: datetime = croniter(entry.cron, start).get_prev(datetime)
    return Slot(entry.name, prev.astimezone(UTC).replace(fold=0))


def next_slot(entry: Entry, now: datetime) -> datetime | None:
    """The first slot of ``entry`` after ``now`` (None when the entry is off)."""
    if entry.cron is None:
        return None
    following: datetime = croniter(entry.cron, now.astimezone(UTC)).get_next(datetime)
    return following.astimezone(UTC).replace(fold=0)


def decide(
    entry: Entry, now: datetime, recorded: set[str], ever_run: bool
) -> tuple[Slot, str] | None:
    """What to do for ``entry`` now: ``(slot, "run")``, ``(slot, "skip")`` (an entry never
    run: its latest slot is only recorded), or None (off, or its latest slot is recorded)."""
    slot = latest_slot(entry, now)
    if slot is None or slot.slot_id in recorded:
        return None
    return slot, "run" if ever_run else "skip"


async def overview(pool: asyncpg.Pool, settings: Settings, now: datetime) -> list[dict[str, Any]]:
    """Each entry with its schedule, its last recorded slot (with outcome) and its next slot."""
    rows = await pool.fetch(
        """
        SELECT DISTINCT ON (entry) entry, slot_id, slot_at, started_at, finished_at, outcome,
               detail
        FROM schedule_runs ORDER BY entry, slot_at DESC
        """
    )
    last = {row["entry"]: dict(row) for row in rows}
    return [
        {"entry": entry.name, "cron": entry.cron or "off", "last": last.get(entry.name),
         "next": next_slot(entry, now)}
        for entry in entries(settings)
    ]

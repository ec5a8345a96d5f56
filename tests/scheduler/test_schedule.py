"""The schedule as data: slots, what is due, settings (pure: no database)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from shared.config import Settings
from shared.schedule import Entry, Slot, decide, entries, latest_slot, next_slot

BATCH = Entry("batch", "0 12 * * 5")  # Fridays 12:00 UTC, the default
NIGHTLY = Entry("collections", "0 3 */2 * *")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(
    ("entry", "now", "slot_at"),
    [
        # 2026-12-04 is a Friday.
        (BATCH, utc(2026, 12, 4, 12, 0, 0), utc(2026, 12, 4, 12)),  # exactly on the slot
        (BATCH, utc(2026, 12, 4, 11, 59, 59), utc(2026, 11, 27, 12)),  # a second before: last week
        (BATCH, utc(2026, 12, 4, 12, 0, 30), utc(2026, 12, 4, 12)),
        (BATCH, utc(2026, 12, 9, 8), utc(2026, 12, 4, 12)),
        # Every other day of the month at 03:00: the 1st, 3rd, ... 31st, then the 1st again.
        (NIGHTLY, utc(2026, 12, 2, 10), utc(2026, 12, 1, 3)),
        (NIGHTLY, utc(2027, 1, 1, 2, 59), utc(2026, 12, 31, 3)),
    ],
)
def test_the_due_slot_is_the_latest_at_or_before_now(
    entry: Entry, now: datetime, slot_at: datetime
) -> None:
    slot = latest_slot(entry, now)
    assert slot == Slot(entry.name, slot_at)
    assert slot.slot_id == f"{entry.name}:{slot_at.isoformat()}"


def test_a_clock_in_another_zone_names_the_same_slot() -> None:
    # 13:30 in Paris (UTC+1 in December) is 12:30 UTC: the Friday slot is due.
    paris = timezone(timedelta(hours=1))
    assert latest_slot(BATCH, datetime(2026, 12, 4, 13, 30, tzinfo=paris)) == Slot(
        "batch", utc(2026, 12, 4, 12))
    assert latest_slot(BATCH, datetime(2026, 12, 4, 12, 30, tzinfo=paris)) == Slot(
        "batch", utc(2026, 11, 27, 12))


def test_daylight_saving_changes_nothing_in_utc() -> None:
    # Europe and North America change their clocks on 2026-03-08, 03-29, 10-25 and 11-01;
    # every Friday slot stays at 12:00 UTC, one week apart.
    now = utc(2026, 1, 2, 12)
    seen = []
    for _ in range(52):
        following = next_slot(BATCH, now)
        assert following is not None
        seen.append(following)
        now = following
    assert all(slot.hour == 12 and slot.minute == 0 and slot.weekday() == 4 for slot in seen)
    assert {b - a for a, b in itertools.pairwise(seen)} == {timedelta(days=7)}


def test_next_slot_is_strictly_after_now() -> None:
    assert next_slot(BATCH, utc(2026, 12, 4, 12)) == utc(2026, 12, 11, 12)
    assert next_slot(BATCH, utc(2026, 12, 4, 11, 59)) == utc(2026, 12, 4, 12)


def test_a_slot_runs_once_and_only_the_latest_missed_one_runs_after_downtime() -> None:
    now = utc(2026, 12, 4, 12, 0, 5)
    slot = latest_slot(BATCH, now)
    assert slot is not None
    assert decide(BATCH, now, set(), ever_run=True) == (slot, "run")
    assert decide(BATCH, now, {slot.slot_id}, ever_run=True) is None
    # Down for three weeks: three Friday slots were missed; on start only the latest is due,
    # and once it is recorded nothing else is.
    back = utc(2026, 12, 26, 9)
    missed_latest = latest_slot(BATCH, back)
    assert missed_latest == Slot("batch", utc(2026, 12, 25, 12))
    assert decide(BATCH, back, {slot.slot_id}, ever_run=True) == (missed_latest, "run")
    assert decide(BATCH, back, {slot.slot_id, missed_latest.slot_id}, ever_run=True) is None


def test_an_entry_never_run_only_records_its_slot() -> None:
    now = utc(2026, 12, 5, 9)
    slot = latest_slot(BATCH, now)
    assert decide(BATCH, now, set(), ever_run=False) == (slot, "skip")


def test_an_entry_turned_off_is_never_due() -> None:
    off = Entry("batch", None)
    assert latest_slot(off, utc(2026, 12, 4, 12)) is None
    assert next_slot(off, utc(2026, 12, 4, 12)) is None
    assert decide(off, utc(2026, 12, 4, 12), set(), ever_run=True) is None


def test_seconds_in_a_sixth_field() -> None:
    every_3_s = Entry("clean-up", "* * * * * */3")
    assert latest_slot(every_3_s, utc(2026, 12, 4, 12, 0, 7)) == Slot("clean-up",
                                                                        utc(2026, 12, 4, 12, 0, 6))


def test_settings_hold_the_schedule_with_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SCHEDULE_BATCH", "SCHEDULE_COLLECTIONS", "SCHEDULE_CLEAN_UP"):
        monkeypatch.delenv(name, raising=False)
    assert [(e.name, e.cron) for e in entries(Settings())] == [
        ("batch", "0 12 * * 5"), ("collections", "0 3 */2 * *"), ("clean-up", "0 5 * * 0")]
    monkeypatch.setenv("SCHEDULE_BATCH", "30 6 * * 1")
    monkeypatch.setenv("SCHEDULE_COLLECTIONS", "OFF")
    monkeypatch.setenv("SCHEDULE_CLEAN_UP", " @daily ")
    assert [(e.name, e.cron) for e in entries(Settings())] == [
        ("batch", "30 6 * * 1"), ("collections", None), ("clean-up", "@daily")]


@pytest.mark.parametrize("bad", ["", "every friday", "61 * * * *", "0 12 * * 8", "* * *"])
def test_a_bad_schedule_setting_is_refused_naming_the_syntax(
    monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    monkeypatch.setenv("SCHEDULE_BATCH", bad)
    with pytest.raises(ValidationError, match="cron expression"):
        Settings()

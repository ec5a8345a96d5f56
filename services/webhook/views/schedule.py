"""The scheduler's schedule as the site shows it (``/api/schedule`` and the home page): each
entry (batch sets, collections, clean-up) with its cron expression in UTC, the last slot
recorded in ``schedule_runs`` with its outcome, and the next slot (``shared.schedule``)."""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web

from services.webhook.keys import POOL, SETTINGS
from services.webhook.views.models import Schedule, ScheduleEntry, ScheduleSlot
from shared.schedule import overview


async def schedule(app: web.Application) -> Schedule:
    now = datetime.now(UTC)
    entries = []
    for item in await overview(app[POOL], app[SETTINGS], now):
        last = item["last"]
        entries.append(ScheduleEntry(
            entry=item["entry"], cron=item["cron"], next=item["next"],
            last=ScheduleSlot(**{name: last[name] for name in ScheduleSlot.model_fields})
            if last else None,
        ))
    return Schedule(now=now, entries=entries)

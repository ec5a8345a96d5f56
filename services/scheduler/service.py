"""The scheduler: waits for leadership, then runs its schedule.

Its real slots (weekly batch sets, nightly collections, coverage maps, clean-up) arrive with
their own issue; today it proves leadership and logs the schedule it will keep.
"""

from __future__ import annotations

import asyncio

import asyncpg

from services.scheduler.leader import acquire_leadership, holds_leadership
from shared.config import Settings
from shared.db import migrate
from shared.logging import get_logger

log = get_logger(__name__)

#: What the scheduler will run, as cron expressions in UTC (documentation for now).
SCHEDULE = {
    "weekly-batch": "0 0 * * 6",
    "nightly-collections": "0 2 * * *",
    "coverage-maps": "0 4 * * *",
    "clean-up": "0 5 * * *",
}


async def serve(settings: Settings, *, burst: bool = False, poll_s: float = 5.0) -> None:
    """Lead and keep the schedule; ``burst`` returns once leadership is taken (tests)."""
    await migrate(settings.database_url)
    conn = await asyncpg.connect(settings.database_url)
    try:
        log.info("scheduler.waiting_for_leadership")
        await acquire_leadership(conn, poll_s=poll_s)
        log.info("scheduler.leading", schedule=SCHEDULE)
        if burst:
            return
        while await holds_leadership(conn):
            await asyncio.sleep(poll_s)
        log.warning("scheduler.lost_leadership")
    finally:
        await conn.close()

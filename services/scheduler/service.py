"""The scheduler: waits for leadership, then runs its schedule.

Its real slots (weekly batch sets, nightly collections, coverage maps, clean-up) arrive with
their own issue; today it proves leadership and logs the schedule it will keep.

PostgreSQL going away is waited out: the leader's connection drops (so PostgreSQL releases the
lock and another replica may take over), this replica reconnects with a back-off and contends
for the lock again. Only a bug ends the service.
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg

from services.scheduler.leader import acquire_leadership, holds_leadership
from shared.config import Settings
from shared.db import migrate
from shared.logging import get_logger
from shared.outage import Backoff, is_outage
from shared.probes import ProbeServer

log = get_logger(__name__)

#: What the scheduler will run, as cron expressions in UTC (documentation for now).
SCHEDULE = {
    "weekly-batch": "0 0 * * 6",
    "nightly-collections": "0 2 * * *",
    "coverage-maps": "0 4 * * *",
    "clean-up": "0 5 * * *",
}


class Scheduler:
    """Leads when it holds the lock; :attr:`leading` says whether it does now."""

    def __init__(self, settings: Settings, *, poll_s: float = 5.0) -> None:
        self.settings = settings
        self.poll_s = poll_s
        self.leading = False
        self._conn: asyncpg.Connection | None = None

    async def ready(self) -> None:
        """Readiness: connected to PostgreSQL (leading or waiting to lead)."""
        conn = self._conn
        if conn is None or conn.is_closed():
            raise ConnectionError("not connected to PostgreSQL")

    async def run(self, *, burst: bool = False) -> None:
        """Contend for leadership and keep the schedule, for ever; ``burst`` returns once
        leadership is taken (tests)."""
        migrated = False
        backoff = Backoff(first_s=1.0, max_s=30.0)
        while True:
            try:
                if not migrated:
                    await migrate(self.settings.database_url)
                    migrated = True
                await self._lead(burst=burst)
                if burst:
                    return
                backoff.reset()
            except Exception as exc:
                if not is_outage(exc):
                    raise
                delay_s = backoff.next_delay_s()
                log.warning("scheduler.database_unavailable", error=repr(exc),
                            retry_in_s=round(delay_s, 1))
                await asyncio.sleep(delay_s)
            finally:
                self.leading = False

    async def _lead(self, *, burst: bool) -> None:
        conn = await asyncpg.connect(self.settings.database_url, timeout=10)
        self._conn = conn
        try:
            log.info("scheduler.waiting_for_leadership")
            await acquire_leadership(conn, poll_s=self.poll_s)
            self.leading = True
            log.info("scheduler.leading", schedule=SCHEDULE)
            if burst:
                return
            while await holds_leadership(conn):
                await asyncio.sleep(self.poll_s)
            log.warning("scheduler.lost_leadership")
        finally:
            self._conn = None
            with contextlib.suppress(Exception):
                await conn.close()


async def serve(settings: Settings, *, burst: bool = False, poll_s: float = 5.0) -> None:
    """Lead and keep the schedule; ``burst`` returns once leadership is taken (tests)."""
    scheduler = Scheduler(settings, poll_s=poll_s)
    if burst:
        await scheduler.run(burst=True)
        return
    async with ProbeServer(settings.http_host, settings.metrics_port,
                           {"database": scheduler.ready}):
        await scheduler.run()

"""The scheduler: one replica leads (a PostgreSQL advisory lock) and keeps the schedule.

Every ``poll_s`` the leader looks at each entry of the schedule (:mod:`shared.schedule`): the
batch set of every source (``batch.py``), the regional collections (a later version builds
them; their slot is recorded as skipped), the clean-up (``cleanup.py``). A due slot is claimed
by inserting its id into ``schedule_runs`` (a primary key), so it runs once however many
schedulers restart or take over; its start, end and outcome are recorded there.

PostgreSQL going away is waited out: the leader's connection drops (so PostgreSQL releases the
lock and another replica may take over), this replica reconnects with a back-off and contends
for the lock again. Only a bug ends the service.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import datetime

import asyncpg

from services.scheduler.batch import make_set
from services.scheduler.cleanup import clean_up
from services.scheduler.collect import collect
from services.scheduler.coverage import draw_if_due
from services.scheduler.leader import acquire_leadership, holds_leadership
from shared.config import Settings
from shared.db import close_pool, create_pool, migrate
from shared.github import GitHub
from shared.logging import get_logger
from shared.outage import Backoff, is_outage
from shared.probes import ProbeServer
from shared.schedule import Slot, decide, entries
from shared.storage import Storage, open_storage

log = get_logger(__name__)

#: A slot interrupted this many times (its scheduler died in it) is recorded as failed.
SLOT_TRIES = 3


class Scheduler:
    """Leads when it holds the lock; :attr:`leading` says whether it does now."""

    def __init__(
        self,
        settings: Settings,
        *,
        pool: asyncpg.Pool | None = None,
        github: GitHub | None = None,
        storage: Storage | None = None,
        poll_s: float = 30.0,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.github = github
        self.storage = storage
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
            await acquire_leadership(conn, poll_s=min(self.poll_s, 5.0))
            self.leading = True
            log.info("scheduler.leading",
                     schedule={e.name: e.cron or "off" for e in entries(self.settings)})
            if burst:
                return
            while await holds_leadership(conn):
                if self.pool is not None:
                    await self.keep_schedule()
                    await self.draw_maps()
                await asyncio.sleep(self.poll_s)
            log.warning("scheduler.lost_leadership")
        finally:
            self._conn = None
            with contextlib.suppress(Exception):
                await conn.close()

    async def keep_schedule(self, now: datetime | None = None) -> list[tuple[str, str]]:
        """Run every slot due ``now`` (the database's clock by default: one clock for every
        replica) that no scheduler ran; returns ``(slot id, outcome)`` of those run."""
        assert self.pool is not None
        if now is None:
            now = await self.pool.fetchval("SELECT now()")
        assert now is not None
        done: list[tuple[str, str]] = []
        for entry in entries(self.settings):
            rows = await self.pool.fetch(
                "SELECT slot_id, finished_at FROM schedule_runs WHERE entry = $1"
                " ORDER BY slot_at DESC LIMIT 5", entry.name)
            finished = {row["slot_id"] for row in rows if row["finished_at"] is not None}
            decision = decide(entry, now, finished, bool(rows))
            if decision is None:
                continue
            slot, what = decision
            outcome = await self._run_slot(slot, what)
            if outcome is not None:
                done.append((slot.slot_id, outcome))
        return done

    async def _run_slot(self, slot: Slot, what: str) -> str | None:
        assert self.pool is not None
        # Only the leader gets here, so a claim left unfinished is one whose leader died or
        # lost the database mid-slot: it is taken again (the actions are idempotent).
        tries = await self.pool.fetchval(
            """
            INSERT INTO schedule_runs (slot_id, entry, slot_at) VALUES ($1, $2, $3)
            ON CONFLICT (slot_id) DO UPDATE
                SET tries = schedule_runs.tries + 1, started_at = now()
                WHERE schedule_runs.finished_at IS NULL
            RETURNING tries
            """,
            slot.slot_id, slot.entry, slot.at,
        )
        if tries is None:
            return None  # finished already
        bound = log.bind(slot=slot.slot_id, tries=tries)
        if what == "skip":
            outcome, detail = "skipped", "first slot seen: recorded, not run"
        elif tries > SLOT_TRIES:
            # Something in the slot kills its scheduler (memory?): do not loop for ever.
            outcome, detail = "failed", f"interrupted {tries - 1} times; not tried again"
        else:
            action = self._actions().get(slot.entry)
            if action is None:
                outcome, detail = "skipped", f"{slot.entry} is not built yet"
            else:
                bound.info("slot.started")
                try:
                    detail = await action(slot)
                    outcome = "done"
                except Exception as exc:
                    if is_outage(exc) and not isinstance(exc, OSError | TimeoutError):
                        raise  # the database went away: the slot's row says it started
                    bound.exception("slot.failed", error=repr(exc))
                    outcome, detail = "failed", repr(exc)[:1000]
        await self.pool.execute(
            "UPDATE schedule_runs SET finished_at = now(), outcome = $2, detail = $3"
            " WHERE slot_id = $1", slot.slot_id, outcome, detail,
        )
        bound.info(f"slot.{outcome}", detail=detail)
        return outcome

    async def draw_maps(self) -> int | None:
        """Draw the coverage maps if a set finished since they were last drawn; returns the
        set's id. A failure is logged and tried again at the next poll."""
        assert self.pool is not None
        if self.storage is None:
            return None
        try:
            return await draw_if_due(self.pool, self.storage)
        except Exception as exc:
            if is_outage(exc) and not isinstance(exc, OSError | TimeoutError):
                raise  # the database went away: waited out like any other outage
            log.exception("coverage.failed", error=repr(exc))
            return None

    def _actions(self) -> dict[str, Callable[[Slot], Awaitable[str]]]:
        return {"batch": self._batch, "collections": self._collections,
                "clean-up": self._clean_up}

    async def _collections(self, _slot: Slot) -> str:
        assert self.pool is not None and self.storage is not None
        built = await collect(self.pool, self.storage)
        return f"{len(built)} zips, {sum(b.size_bytes for b in built)} bytes"

    async def _batch(self, slot: Slot) -> str:
        assert self.pool is not None and self.github is not None
        result = await make_set(self.pool, self.github, self.settings, slot_id=slot.slot_id)
        return f"set {result.set_id}: {result.runs} runs, {result.fetched} files read"

    async def _clean_up(self, _slot: Slot) -> str:
        assert self.pool is not None and self.storage is not None
        report = await clean_up(self.pool, self.storage, self.settings)
        return ", ".join(f"{key} {value}" for key, value in report.as_dict().items()
                         if key != "dry_run")


async def serve(settings: Settings, *, burst: bool = False, poll_s: float | None = None) -> None:
    """Lead and keep the schedule (looking every ``SCHEDULE_POLL_S``); ``burst`` returns once
    leadership is taken (tests)."""
    poll_s = settings.schedule_poll_s if poll_s is None else poll_s
    if burst:
        await Scheduler(settings, poll_s=min(poll_s, 5.0)).run(burst=True)
        return
    pool = await create_pool(settings.database_url, min_size=0, max_size=4)
    token = settings.github_token.get_secret_value() if settings.github_token else None
    github = GitHub.open(settings.github_api_url, token)
    try:
        async with open_storage(settings) as storage:
            scheduler = Scheduler(settings, pool=pool, github=github, storage=storage,
                                  poll_s=poll_s)
            async with ProbeServer(settings.http_host, settings.metrics_port,
                                   {"database": scheduler.ready}):
                await scheduler.run()
    finally:
        await github.close()
        await close_pool(pool)

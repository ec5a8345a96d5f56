"""The dequeuer: consumes `done` (results and heartbeats) and `due`, finishes jobs, and sends
the commit-status outbox to GitHub.
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg

from services.dequeuer.settle import TICK, overdue_runs, record_heartbeat, settle_done, settle_due
from shared.broker import Broker
from shared.config import Settings
from shared.db import create_pool
from shared.errors import MessageError
from shared.github import GitHub
from shared.jobs import send_statuses
from shared.logging import get_logger
from shared.messages import (
    EXCHANGE_DUE,
    QUEUE_DONE,
    QUEUE_DUE,
    ROUTE_DUE,
    Done,
    Due,
    Heartbeat,
    Message,
)

log = get_logger(__name__)


class Dequeuer:
    """Holds the connections; :meth:`run` serves forever, :meth:`tick` does one round of chores."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, broker: Broker, github: GitHub):
        self.settings = settings
        self.pool = pool
        self.broker = broker
        self.github = github
        self._wake = asyncio.Event()

    async def on_done(self, message: Message) -> None:
        """Handle one message from the `done` queue: a result or a heartbeat."""
        if isinstance(message, Heartbeat):
            await record_heartbeat(self.pool, message)
        elif not isinstance(message, Done):  # the broker only passes accepted kinds
            raise MessageError(f"unexpected {type(message).__name__} on the done queue")
        elif await settle_done(self.pool, message, self.settings.public_base_url):
            self._wake.set()

    async def on_due(self, message: Due) -> None:
        """Handle one message from the `due` queue."""
        if await settle_due(self.pool, message, self.settings.public_base_url):
            self._wake.set()

    async def tick(self) -> None:
        """Send pending statuses and publish `due` for overdue runs."""
        await send_statuses(self.pool, self.github)
        for due in await overdue_runs(self.pool):
            await self.broker.publish(EXCHANGE_DUE, ROUTE_DUE, due)

    async def run(self) -> None:
        """Consume both queues and tick until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(
                self.broker.consume(QUEUE_DONE, self.on_done, accept=(Done, Heartbeat))
            )
            group.create_task(self.broker.consume(QUEUE_DUE, self.on_due, accept=(Due,)))
            group.create_task(self._chores())

    async def _chores(self) -> None:
        log.info("dequeuer.started")
        while True:
            try:
                await self.tick()
            except Exception:  # a failed chore must not stop consumption; it runs again soon
                log.exception("dequeuer.tick_failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                # A settled job wakes the loop early so its status goes out at once.
                await asyncio.wait_for(self._wake.wait(), TICK.total_seconds())


async def serve(settings: Settings) -> None:
    """Open connections and run the dequeuer until cancelled."""
    pool = await create_pool(settings.database_url)
    broker = await Broker.connect(settings.amqp_url, prefetch=16)
    token = settings.github_token.get_secret_value() if settings.github_token else None
    github = GitHub.open(settings.github_api_url, token)
    try:
        await Dequeuer(settings, pool, broker, github).run()
    finally:
        await github.close()
        await broker.close()
        await pool.close()

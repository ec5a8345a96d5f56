"""The dequeuer: settles runs from `done` (results, heartbeats, hand-backs) and `due`, finishes
jobs, sends the commit-status outbox, gives lost work back, and watches workers and queues.

Its chores run every :data:`TICK`: statuses to GitHub, `due` for runs past their deadline,
expired leases and vanished tasks (``recovery.py``), the dispatcher for unqueued runs
(``shared/dispatch.py``), worker states and gauges (``watch.py``). A finished job or a released
run wakes the quick ones at once (statuses and the dispatcher, :meth:`Dequeuer.hurry`). Every
chore is guarded in SQL, so any number of dequeuers may run side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import timedelta

import asyncpg
from aiohttp import web

from services.dequeuer.batch import DoneBatcher
from services.dequeuer.recovery import Rules, expire_leases, sweep_unseen
from services.dequeuer.settle import (
    overdue_runs,
    record_heartbeat,
    record_returned,
    settle_due,
)
from services.dequeuer.watch import count_runs, refresh_gauges, update_worker_states
from shared.broker import Broker
from shared.config import Settings
from shared.db import close_pool, create_pool
from shared.dispatch import BATCH, dispatch
from shared.errors import MessageError
from shared.github import GitHub
from shared.logging import get_logger
from shared.messages import (
    EXCHANGE_DUE,
    QUEUE_DONE,
    QUEUE_DUE,
    QUEUE_TASKS,
    ROUTE_DUE,
    Done,
    Due,
    Heartbeat,
    Message,
    Returned,
)
from shared.outage import is_outage
from shared.outbox import send_statuses
from shared.probes import ProbeServer, broker_check, database_check

log = get_logger(__name__)

#: How often the chores run when nothing wakes them sooner.
TICK = timedelta(seconds=10)
#: Rounds of dispatching per tick (each up to shared.dispatch.BATCH runs).
DISPATCH_ROUNDS = 10
#: Messages the dequeuer handles at once (per queue): results are settled in batches of up
#: to this many (services/dequeuer/batch.py).
PREFETCH = 200
#: Where KEDA's metrics-api trigger reads how many runs are queued or running, and the key.
SCALING_PATH = "/scaling"
SCALING_METRIC = "runs_in_flight"


class Dequeuer:
    """Holds the connections; :meth:`run` serves forever, :meth:`tick` does one round of chores."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, broker: Broker, github: GitHub):
        self.settings = settings
        self.rules = Rules.of(settings)
        self.pool = pool
        self.broker = broker
        self.github = github
        self.batcher = DoneBatcher(pool, self.rules)
        self._wake = asyncio.Event()
        #: Last outage this process saw in its own chores (monotonic clock).
        self._last_trouble_at = time.monotonic()
        #: The metrics and health server, once :meth:`run` has started it.
        self.probes: ProbeServer | None = None

    async def on_done(self, message: Message) -> None:
        """Handle one message from the `done` queue: a result, a heartbeat or a hand-back."""
        if isinstance(message, Heartbeat):
            await record_heartbeat(self.pool, message, self.rules)
        elif isinstance(message, Returned):
            if await record_returned(self.pool, message, self.rules):
                self._wake.set()  # queue it again (or send the job's status) now
        elif isinstance(message, Done):
            outcome = await self.batcher.settle(message)
            if outcome.job_finished or outcome.set_run:
                self._wake.set()  # a status to send, or room for another batch task
        else:  # the broker only passes accepted kinds
            raise MessageError(f"unexpected {type(message).__name__} on the done queue")

    async def on_due(self, message: Due) -> None:
        """Handle one message from the `due` queue."""
        if await settle_due(self.pool, message, self.settings.public_base_url):
            self._wake.set()

    def recovery_allowed(self) -> bool:
        """Whether runs may be presumed lost now: no outage seen for a whole lease.

        After an outage, heartbeats that were held up (in the `done` queue, or in workers that
        could not publish) need up to a lease to arrive; presuming their runs lost before that
        would run them twice.
        """
        quiet_since = max(self._last_trouble_at, self.broker.last_trouble_at)
        return time.monotonic() - quiet_since >= self.settings.run_lease_s

    async def tick(self) -> None:
        """One round of every chore."""
        await self.hurry()
        for due in await overdue_runs(self.pool):
            await self.broker.publish(EXCHANGE_DUE, ROUTE_DUE, due)
        await self._recover()
        await self._dispatch()
        await update_worker_states(self.pool, self.settings)
        await refresh_gauges(self.pool, self.broker)

    async def hurry(self) -> None:
        """What cannot wait for the next tick: statuses of finished jobs, runs to queue."""
        await send_statuses(self.pool, self.github,
                            public_base_url=self.settings.public_base_url)
        await self._dispatch()

    async def _dispatch(self) -> None:
        for _ in range(DISPATCH_ROUNDS):
            result = await dispatch(
                self.pool, self.broker, run_timeout_s=self.settings.run_timeout_s,
                public_base_url=self.settings.public_base_url, limit=BATCH,
                batch_room=min(await self.batch_room(), BATCH),
            )
            if result.queued + result.failed < BATCH or result.left:
                break

    async def batch_room(self) -> int:
        """How many more batch tasks the queue may take now (back-pressure).

        The queue is kept under ``BATCH_QUEUE_DEPTH`` tasks, or by default twice the active
        workers (at least 10), so that a set of thousands of runs is fed as runs settle, the
        workers scale up steadily, and a pull request's task never waits behind thousands.
        """
        depth = self.settings.batch_queue_depth
        if depth == 0:
            active = await self.pool.fetchval(
                "SELECT count(*) FROM workers WHERE last_seen_at > now() - $1::interval",
                timedelta(seconds=self.settings.worker_inactive_s),
            )
            depth = max(2 * int(active), 10)
        ready, _consumers = await self.broker.queue_depth(QUEUE_TASKS)
        return max(depth - ready, 0)

    async def _recover(self) -> None:
        if not self.recovery_allowed():
            return
        # Heartbeats still waiting in `done` may renew leases about to be expired: only go on
        # when the backlog is no more than what the consumers hold.
        backlog, _consumers = await self.broker.queue_depth(QUEUE_DONE)
        if backlog > PREFETCH:
            log.info("dequeuer.recovery_deferred", done_backlog=backlog)
            return
        if await expire_leases(self.pool, self.rules):
            self._wake.set()
        seen_at = await self.pool.fetchval("SELECT now()")
        ready, _consumers = await self.broker.queue_depth(QUEUE_TASKS)
        if ready == 0:
            await sweep_unseen(self.pool, self.rules, seen_empty_at=seen_at)

    async def run(self, *, probes: bool = True) -> None:
        """Consume both queues, serve probes and tick until cancelled."""
        async with contextlib.AsyncExitStack() as stack:
            if probes:
                server = ProbeServer(
                    self.settings.http_host, self.settings.metrics_port,
                    {"database": database_check(self.pool), "broker": broker_check(self.broker)},
                    routes={SCALING_PATH: self.scaling_view},
                )
                await stack.enter_async_context(server)
                self.probes = server
            stack.push_async_callback(self.batcher.close)
            async with asyncio.TaskGroup() as group:
                group.create_task(self.broker.consume(
                    QUEUE_DONE, self.on_done, accept=(Done, Heartbeat, Returned)))
                group.create_task(self.broker.consume(QUEUE_DUE, self.on_due, accept=(Due,)))
                group.create_task(self._chores())

    async def scaling_view(self, request: web.Request) -> web.Response:
        """What KEDA's metrics-api trigger reads: runs queued or running, as JSON."""
        runs = await count_runs(self.pool)
        return web.json_response({
            SCALING_METRIC: runs.in_flight, "queued": runs.queued, "running": runs.running,
            "unqueued": runs.unqueued, "retrying": runs.retrying,
        })

    async def _chores(self) -> None:
        log.info("dequeuer.started")
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while True:
            full = loop.time() >= next_tick
            try:
                if full:
                    next_tick = loop.time() + TICK.total_seconds()
                    await self.tick()
                else:
                    await self.hurry()
            except Exception as exc:  # a failed chore must not stop consumption; it runs again
                if is_outage(exc):
                    self._last_trouble_at = time.monotonic()
                    log.warning("dequeuer.tick_waiting", error=repr(exc))
                else:
                    log.exception("dequeuer.tick_failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                # A finished job or a released run wakes the loop early, for the quick chores
                # only; the full round keeps its pace.
                await asyncio.wait_for(self._wake.wait(), max(next_tick - loop.time(), 0.0))


async def serve(settings: Settings) -> None:
    """Open connections and run the dequeuer until cancelled.

    Starts while PostgreSQL or RabbitMQ is down and waits for them: the pool connects on first
    use and the broker in the background.
    """
    pool = await create_pool(settings.database_url, min_size=0)
    broker = Broker(settings.amqp_url, prefetch=PREFETCH)
    broker.start()
    token = settings.github_token.get_secret_value() if settings.github_token else None
    github = GitHub.open(settings.github_api_url, token)
    try:
        await Dequeuer(settings, pool, broker, github).run()
    finally:
        await github.close()
        await broker.close()
        await close_pool(pool)

"""The worker service: takes tasks, runs each in an isolated child, uploads, reports `done`.

The life of a task here (see :mod:`shared.broker` for the feed and
``services/dequeuer/recovery.py`` for what happens when a worker goes away):

1. The feed delivers a task while a slot is free. Before acknowledging it the worker publishes
   a heartbeat naming the run, its attempt and its deadline: from then on the run's lease (in
   PostgreSQL) protects it. Heartbeats go on every ``WORKER_HEARTBEAT_S`` while it runs.
2. The run's child process does the work within the run's time and memory limits; its log is
   stored every ``WORKER_LIVE_LOG_S`` while it grows (the run's page shows it), its outputs go
   to storage at the end.
3. Its `done` is written to the local outbox first, then published (``outbox.py``): a result is
   never dropped because the broker was away, even if the worker restarts meanwhile.

Stopping (SIGTERM): the worker takes no more tasks and lets its runs finish for
``WORKER_GRACE_S``; runs still going are then stopped and handed back (`returned`, through the
outbox), which the dequeuer turns into a new attempt on another worker. Then it exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from services.worker.isolation import LOG, Limits, RunRequest, run_isolated
from services.worker.outbox import Outbox
from services.worker.sources.hosts import SLOTS_FOLDER
from services.worker.state import RunState
from services.worker.zygote import ZYGOTE
from shared.broker import Broker
from shared.config import Settings
from shared.feed import TaskFeed
from shared.logging import get_logger
from shared.messages import (
    EXCHANGE_DONE,
    QUEUE_TASKS,
    ROUTE_DONE,
    ROUTE_HEARTBEAT,
    ROUTE_RETURNED,
    Done,
    Heartbeat,
    Returned,
    Task,
    utcnow,
)
from shared.outage import Backoff, is_outage
from shared.probes import ProbeServer, broker_check
from shared.storage import Storage, open_storage

log = get_logger(__name__)

#: Time past a run's own limit for uploading and reporting before the dequeuer gives up on it.
DEADLINE_GRACE = timedelta(minutes=15)
#: How long a stopping worker tries to publish its hand-backs before it exits anyway (they stay
#: in the outbox, and the runs' leases expire if the outbox is lost with the pod).
STOP_PUBLISH_S = 15.0
#: The most of a run's log stored while it runs, from its end (the run's page shows less).
LIVE_LOG_MAX_BYTES = 4 * 1024 * 1024
#: How long the end of a run waits for a store of its log under way (storage being slow).
LIVE_LOG_STOP_S = 30.0


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    """One worker process; handles up to ``settings.worker_concurrency`` runs at once."""

    def __init__(self, settings: Settings, broker: Broker, storage: Storage) -> None:
        self.settings = settings
        self.broker = broker
        self.storage = storage
        self.name = settings.worker_name or default_worker_name()
        self.outbox = Outbox(settings.work_dir / "outbox", broker)
        self._running: dict[int, Task] = {}
        self._runs: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._handing_back = False

    def stop(self) -> None:
        """Take no more tasks; let runs finish within the grace period, hand back the rest."""
        if not self._stopping.is_set():
            log.info("worker.stopping", worker=self.name, runs=len(self._running),
                     grace_s=self.settings.worker_grace_s)
        self._stopping.set()

    async def claim(self, task: Task) -> None:
        """Announce the run before the task is acknowledged (the feed's ``before_ack``)."""
        timeout_s = task.timeout_s or self.settings.run_timeout_s
        deadline = utcnow() + timedelta(seconds=timeout_s) + DEADLINE_GRACE
        await self._beat(task, deadline_at=deadline)

    async def handle(self, task: Task) -> None:
        """Process one claimed task to the end: its `done`, or a `returned` if stopped."""
        bound = log.bind(run_id=task.run_id, job_id=task.job_id, source=task.source_path,
                         layer=task.layer, entry=task.entry_name, attempt=task.attempt)
        timeout_s = task.timeout_s or self.settings.run_timeout_s
        self._running[task.run_id] = task
        started_at = utcnow()
        workdir = self.settings.work_dir / f"run-{task.run_id}-{task.attempt}"
        try:
            bound.info("run.started")
            outdir = workdir / "out"
            request = RunRequest(
                source=task.source, source_path=task.source_path, layer=task.layer,
                entry_name=task.entry_name, outdir=str(outdir), workdir=str(workdir / "tmp"),
                allow_files=False, allow_private=self.settings.allow_private_urls,
                max_unpacked_bytes=self.settings.max_unpacked_bytes,
                max_download_bytes=self.settings.max_download_bytes,
                esri_host_limit=self.settings.esri_host_limit,
                # Shared by every run of this worker, so the limit holds across them.
                host_slots_dir=str(self.settings.work_dir / SLOTS_FOLDER),
                user_agent=self.settings.user_agent,
                previous=task.previous.model_dump() if task.previous else None,
            )
            ended = asyncio.Event()
            sharing = asyncio.create_task(self._share_log(task.run_id, outdir / LOG, ended))
            try:
                state = await run_isolated(
                    request, Limits(timeout_s, self.settings.run_memory_bytes))
            finally:
                # Stopped, and a store under way let finish, before the outputs go up: the
                # whole log must be the one stored last. Not cancelled mid-store (a store in a
                # thread would go on and could land after it).
                ended.set()
                finished, _ = await asyncio.wait({sharing}, timeout=LIVE_LOG_STOP_S)
                if not finished:
                    sharing.cancel()
            outputs = await self._upload(task.run_id, outdir)
            if state.reused_from is not None and task.previous is not None:
                # Unchanged data: the earlier run's files stand; this run adds its own state
                # and log.
                outputs = {**task.previous.outputs, **outputs}
            done = _done_message(task, self.name, state, outputs, started_at)
            sent = await self.outbox.send(EXCHANGE_DONE, ROUTE_DONE, done)
            bound.info(f"run.{done.status}", problem=state.source_problem, error=state.error,
                       features=state.feature_count, retryable=done.retryable, reported=sent)
        except asyncio.CancelledError:
            if self._handing_back:
                # The child was killed by the cancellation (run_isolated); give the run back.
                self.outbox.put(EXCHANGE_DONE, ROUTE_RETURNED, Returned(
                    run_id=task.run_id, attempt=task.attempt, worker=self.name,
                    reason=f"the worker was stopped and its {self.settings.worker_grace_s:g} s "
                           "grace period ran out",
                ))
                bound.warning("run.handed_back")
            raise
        except Exception as exc:
            # Storage down for good, a bug: nothing to report on; the run's lease expires and
            # the dequeuer gives it to a worker again.
            bound.exception("run.abandoned", error=repr(exc))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            self._running.pop(task.run_id, None)

    async def _upload(self, run_id: int, outdir: Path) -> dict[str, str]:
        """Upload the run's outputs, waiting out a storage outage (the run's heartbeats go on
        meanwhile, so its lease holds; its deadline is the limit)."""
        backoff = Backoff(first_s=1.0, max_s=30.0)
        while True:
            try:
                return await self._upload_once(run_id, outdir)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                delay_s = backoff.next_delay_s()
                log.warning("run.upload_waiting", run_id=run_id, error=repr(exc),
                            retry_in_s=round(delay_s, 1))
                await asyncio.sleep(delay_s)

    async def _share_log(self, run_id: int, path: Path, ended: asyncio.Event) -> None:
        """Store the log of a run in progress every ``WORKER_LIVE_LOG_S`` when it grew (its
        page reads ``runs/{id}/output.txt`` while the run has no outputs yet), until ``ended``.
        A failed store is only logged: the log is a courtesy until the run ends."""
        stored = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), self.settings.worker_live_log_s)
            if ended.is_set():
                return
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            if size == stored:
                continue
            try:
                # A snapshot (the tail, past LIVE_LOG_MAX_BYTES): the child is still writing.
                data = await asyncio.to_thread(_tail_of, path, LIVE_LOG_MAX_BYTES)
                await self.storage.put_bytes(f"runs/{run_id}/{LOG}", data,
                                             content_type="text/plain; charset=utf-8")
                stored = size
            except Exception as exc:
                log.warning("run.live_log_failed", run_id=run_id, error=repr(exc))

    async def _upload_once(self, run_id: int, outdir: Path) -> dict[str, str]:
        outputs: dict[str, str] = {}
        for path in sorted(outdir.iterdir()):
            if path.is_file():
                key = f"runs/{run_id}/{path.name}"
                await self.storage.put_file(key, path)
                outputs[path.name] = key
        return outputs

    async def _beat(self, task: Task | None = None, **extra: Any) -> None:
        state = "stopping" if self._stopping.is_set() else ("running" if task else "idle")
        beat = Heartbeat(
            worker=self.name, hostname=socket.gethostname(), pid=os.getpid(),
            run_id=task.run_id if task else None, attempt=task.attempt if task else None,
            state=state, **extra,
        )
        await self.broker.publish(EXCHANGE_DONE, ROUTE_HEARTBEAT, beat)

    async def heartbeats(self) -> None:
        """Report liveness every ``WORKER_HEARTBEAT_S``, naming the runs in progress.

        After a failed beat the next comes sooner, so a run's lease is renewed as soon as the
        broker is back.
        """
        while True:
            try:
                if self._running:
                    for task in list(self._running.values()):
                        await self._beat(task)
                else:
                    await self._beat()
                delay_s = self.settings.worker_heartbeat_s
            except Exception as exc:  # the broker is reconnecting; the next beat will tell
                log.warning("worker.heartbeat_failed", error=repr(exc))
                delay_s = min(2.0, self.settings.worker_heartbeat_s)
            await asyncio.sleep(delay_s)

    async def run(self, *, once: bool = False) -> None:
        """Take tasks until :meth:`stop` (or, with ``once``, after the first run), then wind down.

        ``once`` is the one-run-per-pod mode (a KEDA ScaledJob starts a pod per task).
        """
        log.info("worker.started", worker=self.name, once=once,
                 concurrency=self.settings.worker_concurrency)
        self.broker.on_reconnect.append(self.outbox.wake)
        helpers = [
            asyncio.create_task(self.outbox.run()),
            asyncio.create_task(self.heartbeats()),
        ]
        self.outbox.wake()  # what a previous life of this worker could not send
        feed = TaskFeed(
            self.broker, QUEUE_TASKS, (Task,),
            capacity=1 if once else self.settings.worker_concurrency, before_ack=self.claim,
        )
        try:
            await self._take(feed, once=once)
            await feed.close()  # what was delivered but not taken goes back to the queue
            if once:
                await self._until_runs_end_or_stop()
            await self._wind_down()
        finally:
            await feed.close()
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            for run in self._runs:
                run.cancel()
            if self._runs:
                await asyncio.gather(*self._runs, return_exceptions=True)
            log.info("worker.stopped", worker=self.name)

    async def _take(self, feed: TaskFeed[Task], *, once: bool) -> None:
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                taking = asyncio.ensure_future(feed.next())
                await asyncio.wait({taking, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not taking.done():
                    taking.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await taking
                    if not taking.cancelled() and taking.exception() is None:
                        # Taken in the same instant as the stop: run it all the same.
                        self._start(taking.result(), feed)
                    break
                self._start(taking.result(), feed)
                if once:
                    return
        finally:
            stopping.cancel()

    async def _until_runs_end_or_stop(self) -> None:
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while self._runs and not self._stopping.is_set():
                await asyncio.wait({*self._runs, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()

    def _start(self, task: Task, feed: TaskFeed[Task]) -> None:
        run = asyncio.create_task(self.handle(task))
        self._runs.add(run)

        def finished(done: asyncio.Task[None]) -> None:
            self._runs.discard(done)
            feed.release()

        run.add_done_callback(finished)

    async def _wind_down(self) -> None:
        """Let runs finish within the grace period, hand back the rest, publish what is left."""
        if self._runs:
            grace_s = self.settings.worker_grace_s
            _finished, late = await asyncio.wait(set(self._runs), timeout=grace_s)
            if late:
                self._handing_back = True
                for run in late:
                    run.cancel()
                await asyncio.gather(*late, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._flush_all(), STOP_PUBLISH_S)
        if self.outbox.pending():
            log.warning("worker.outbox_left", pending=len(self.outbox.pending()),
                        folder=str(self.outbox.folder))

    async def _flush_all(self) -> None:
        while self.outbox.pending():
            if not await self.outbox.flush():
                await asyncio.sleep(1.0)


def _tail_of(path: Path, limit: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(handle.tell() - limit, 0))
        return handle.read(limit)


def _done_message(
    task: Task, worker: str, state: RunState, outputs: dict[str, str], started_at: datetime
) -> Done:
    status = "skipped" if state.skipped else ("success" if state.succeeded else "failure")
    return Done(
        run_id=task.run_id, attempt=task.attempt, worker=worker, status=status,
        source_problem=None if status == "success" else state.source_problem,
        error=state.error, outputs=outputs, state=state.to_json(),
        started_at=started_at, retryable=status == "failure" and state.retryable,
    )


async def serve(settings: Settings, worker_ref: list[Worker] | None = None, *,
                once: bool = False) -> None:
    """Open connections and work until stopped (or, with ``once``, until one run is done).

    ``worker_ref`` receives the :class:`Worker` as soon as it exists, so the caller can ask it
    to :meth:`Worker.stop` (the service's SIGTERM handler does).
    """
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    # Runs fork from the zygote; it imports while we connect, so the first run waits less.
    ZYGOTE.for_service()
    ZYGOTE.start()
    broker = Broker(settings.amqp_url, prefetch=settings.worker_concurrency)
    broker.start()
    try:
        async with open_storage(settings) as storage:
            worker = Worker(settings, broker, storage)
            if worker_ref is not None:
                worker_ref.append(worker)
            probes = ProbeServer(settings.http_host, settings.metrics_port,
                                 {"broker": broker_check(broker)})
            async with probes:
                await worker.run(once=once)
    finally:
        await broker.close()
        await asyncio.to_thread(ZYGOTE.close)

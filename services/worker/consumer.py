"""The worker service: takes tasks, runs each in an isolated child, uploads, reports `done`.

Ack policy: tasks are consumed with ``ack_early`` (see :mod:`shared.broker`): a run can last
hours, longer than RabbitMQ's consumer timeout. The first thing a run does is publish a
heartbeat naming it with its deadline, so a worker that dies mid-run leaves a deadline behind
and the dequeuer's `due` flow settles the run.
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

from services.worker.isolation import Limits, RunRequest, run_isolated
from services.worker.state import RunState
from services.worker.zygote import ZYGOTE
from shared.broker import Broker
from shared.config import Settings
from shared.logging import get_logger
from shared.messages import (
    EXCHANGE_DONE,
    QUEUE_TASKS,
    ROUTE_DONE,
    ROUTE_HEARTBEAT,
    Done,
    Heartbeat,
    Task,
    utcnow,
)
from shared.storage import Storage, open_storage

log = get_logger(__name__)

#: Between two heartbeats, also while a run is in progress.
HEARTBEAT_S = 30.0
#: Time past a run's own limit for uploading and reporting before the dequeuer gives up on it.
DEADLINE_GRACE = timedelta(minutes=15)


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    """One worker process; handles up to ``settings.worker_concurrency`` runs at once."""

    def __init__(self, settings: Settings, broker: Broker, storage: Storage) -> None:
        self.settings = settings
        self.broker = broker
        self.storage = storage
        self.name = settings.worker_name or default_worker_name()
        self._running: dict[int, Task] = {}

    async def handle(self, task: Task) -> None:
        """Process one task to the end; always publishes exactly one `done`."""
        bound = log.bind(run_id=task.run_id, job_id=task.job_id, source=task.source_path,
                         layer=task.layer, entry=task.entry_name)
        timeout_s = task.timeout_s or self.settings.run_timeout_s
        deadline = utcnow() + timedelta(seconds=timeout_s) + DEADLINE_GRACE
        self._running[task.run_id] = task
        started_at = utcnow()
        try:
            await self._beat(task, deadline_at=deadline)
            bound.info("run.started", attempt=task.attempt)
            workdir = self.settings.work_dir / f"run-{task.run_id}-{task.attempt}"
            outdir = workdir / "out"
            request = RunRequest(
                source=task.source, source_path=task.source_path, layer=task.layer,
                entry_name=task.entry_name, outdir=str(outdir), workdir=str(workdir / "tmp"),
                allow_files=False, allow_private=self.settings.allow_private_urls,
                max_unpacked_bytes=self.settings.max_unpacked_bytes,
                previous=task.previous.model_dump() if task.previous else None,
            )
            try:
                state = await run_isolated(
                    request, Limits(timeout_s, self.settings.run_memory_bytes)
                )
                outputs = await self._upload(task.run_id, outdir)
                if state.reused_from is not None and task.previous is not None:
                    # Unchanged data: the earlier run's files stand; this run adds its own
                    # state and log.
                    outputs = {**task.previous.outputs, **outputs}
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            done = _done_message(task, self.name, state, outputs, started_at)
            await self.broker.publish(EXCHANGE_DONE, ROUTE_DONE, done)
            bound.info(f"run.{done.status}", problem=state.source_problem, error=state.error,
                       features=state.feature_count)
        finally:
            self._running.pop(task.run_id, None)

    async def _upload(self, run_id: int, outdir: Path) -> dict[str, str]:
        outputs: dict[str, str] = {}
        for path in sorted(outdir.iterdir()):
            if path.is_file():
                key = f"runs/{run_id}/{path.name}"
                await self.storage.put_file(key, path)
                outputs[path.name] = key
        return outputs

    async def _beat(self, task: Task | None = None, **extra: Any) -> None:
        beat = Heartbeat(
            worker=self.name, hostname=socket.gethostname(), pid=os.getpid(),
            run_id=task.run_id if task else None, attempt=task.attempt if task else None,
            state="running" if task else "idle", **extra,
        )
        await self.broker.publish(EXCHANGE_DONE, ROUTE_HEARTBEAT, beat)

    async def heartbeats(self) -> None:
        """Report liveness every ``HEARTBEAT_S``, naming the runs in progress."""
        while True:
            try:
                if self._running:
                    for task in list(self._running.values()):
                        await self._beat(task)
                else:
                    await self._beat()
            except Exception as exc:  # the broker is reconnecting; the next beat will tell
                log.warning("worker.heartbeat_failed", error=repr(exc))
            await asyncio.sleep(HEARTBEAT_S)

    async def run(self, *, once: bool = False) -> None:
        """Consume tasks and beat until cancelled; ``once`` returns after the first run.

        ``once`` is the one-run-per-pod mode (a KEDA ScaledJob starts a pod per task).
        """
        log.info("worker.started", worker=self.name, once=once)
        finished = asyncio.Event()

        async def handle(task: Task) -> None:
            try:
                await self.handle(task)
            finally:
                finished.set()

        async with asyncio.TaskGroup() as group:
            beats = group.create_task(self.heartbeats())
            consumer = group.create_task(
                self.broker.consume(QUEUE_TASKS, handle, accept=(Task,), ack_early=True)
            )
            if once:
                await finished.wait()
                consumer.cancel()
                beats.cancel()


def _done_message(
    task: Task, worker: str, state: RunState, outputs: dict[str, str], started_at: datetime
) -> Done:
    status = "skipped" if state.skipped else ("success" if state.succeeded else "failure")
    return Done(
        run_id=task.run_id, attempt=task.attempt, worker=worker, status=status,
        source_problem=None if status == "success" else state.source_problem,
        error=state.error, outputs=outputs, state=state.to_json(),
        started_at=started_at,
    )


async def serve(settings: Settings, *, once: bool = False) -> None:
    """Open connections and work until cancelled (or, with ``once``, until one run is done)."""
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    # Runs fork from the zygote; it imports while we connect, so the first run waits less.
    ZYGOTE.start()
    try:
        broker = await Broker.connect(settings.amqp_url, prefetch=settings.worker_concurrency)
        try:
            async with open_storage(settings) as storage:
                with contextlib.suppress(asyncio.CancelledError):
                    await Worker(settings, broker, storage).run(once=once)
        finally:
            await broker.close()
    finally:
        await asyncio.to_thread(ZYGOTE.close)

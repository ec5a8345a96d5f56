"""Taking work from a queue a few items at a time: the worker's side of the `tasks` queue.

See :mod:`shared.broker` ("Taking work") for why a task is acknowledged when its run starts and
what protects it from then on. In short: :meth:`TaskFeed.next` hands out a task only once
``before_ack`` (the worker's first heartbeat naming the run) has been confirmed by the broker,
then acknowledges it; the feed is subscribed (``basic.consume``) only while one of its
``capacity`` slots is free, so a busy worker never hoards tasks that another could start, and
a new task reaches an idle worker at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Generic

import structlog
from aio_pika.abc import AbstractIncomingMessage, ConsumerTag

from shared import metrics
from shared.broker import CLOSE_GRACE_S, Broker, M, accepted, ids_of, quietly
from shared.errors import MessageError
from shared.outage import Backoff

log = structlog.get_logger(__name__)


class TaskFeed(Generic[M]):
    """Work items of one queue for a process that runs at most ``capacity`` at once.

    :meth:`next` returns an item once ``before_ack`` has succeeded for it and it is acked: from
    then on the caller owns it. :meth:`release` frees its slot when the work is over.
    A message that arrives while every slot is taken (possible in the instant between a slot
    filling and the subscription's cancellation) goes straight back to the queue.
    """

    def __init__(
        self,
        broker: Broker,
        queue: str,
        accept: tuple[type[M], ...],
        *,
        capacity: int,
        before_ack: Callable[[M], Awaitable[None]],
    ) -> None:
        self._broker = broker
        self._queue = queue
        self._accept = accept
        self._capacity = capacity
        self._before_ack = before_ack
        #: Slots in use: delivered and waiting in ``_arrived``, or taken by the caller.
        self._used = 0
        self._arrived: asyncio.Queue[tuple[AbstractIncomingMessage, M]] = asyncio.Queue()
        self._changed = asyncio.Event()
        self._closed = False
        self._manager: asyncio.Task[None] | None = None
        self._held = metrics.UNACKED.labels(queue)
        broker.track(self)

    @property
    def free(self) -> int:
        """Slots not in use."""
        return self._capacity - self._used

    async def next(self) -> M:
        """The next item, acked and owned by the caller; waits while none is available."""
        if self._manager is None:
            self._manager = asyncio.create_task(self._manage())
        while True:
            message, model = await self._arrived.get()
            self._held.dec()
            try:
                await self._before_ack(model)
                await asyncio.shield(message.ack())
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await asyncio.shield(message.nack(requeue=True))
                self.release()
                raise
            except Exception as exc:
                # Not announced or not acked (the broker is gone): the task stays in, or goes
                # back to, the queue for whoever takes it next, maybe us.
                log.warning("broker.take_failed", queue=self._queue, error=repr(exc),
                            **ids_of(model))
                with contextlib.suppress(Exception):
                    await message.nack(requeue=True)
                self.release()
                continue
            return model

    def release(self) -> None:
        """One slot is free again."""
        self._used = max(self._used - 1, 0)
        self._changed.set()

    async def close(self) -> None:
        """Unsubscribe and give back every delivered item the caller has not taken."""
        self._closed = True
        self._changed.set()
        if self._manager is not None:
            self._manager.cancel()
            with contextlib.suppress(BaseException):
                await self._manager
        while not self._arrived.empty():
            message, _model = self._arrived.get_nowait()
            self._held.dec()
            self._used = max(self._used - 1, 0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(message.nack(requeue=True), CLOSE_GRACE_S)
        self._broker.untrack(self)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if self._closed or self._used >= self._capacity:
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
            return
        try:
            model = accepted(message, self._accept)
        except MessageError as exc:
            log.warning("broker.dead_lettered", queue=self._queue, reason=str(exc))
            metrics.DEAD_LETTERED.labels(self._queue).inc()
            with contextlib.suppress(Exception):
                await message.reject(requeue=False)
            return
        self._used += 1
        self._held.inc()
        self._changed.set()
        self._arrived.put_nowait((message, model))

    async def _manage(self) -> None:
        """Subscribed while a slot is free, unsubscribed while all are taken."""
        broker = self._broker
        await broker.wait_opened()
        channel, amqp_queue = await broker.subscription_channel(self._queue, self._capacity)
        tag: ConsumerTag | None = None
        backoff = Backoff()
        try:
            while not self._closed:
                self._changed.clear()
                try:
                    if tag is None and self._used < self._capacity:
                        tag = await amqp_queue.consume(self._on_message)
                        log.info("broker.consuming", queue=self._queue, free=self.free)
                    elif tag is not None and self._used >= self._capacity:
                        # Forget the tag first: a cancel that fails (the channel is down) still
                        # keeps the robust queue from restoring the subscription.
                        old, tag = tag, None
                        await amqp_queue.cancel(old)
                    backoff.reset()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("broker.subscription_failed", queue=self._queue, error=repr(exc))
                    await backoff.wait()
                    continue
                await self._changed.wait()
        finally:
            if tag is not None:
                await quietly(amqp_queue.cancel(tag))
            await quietly(channel.close())

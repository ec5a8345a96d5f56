"""RabbitMQ: topology, confirmed persistent publishing, and consuming with one ack policy.

The topology (exchanges, queues, priorities) is in :mod:`shared.topology`.

Connecting
    :class:`Broker` connects in the background and keeps reconnecting for as long as it lives
    (aio-pika's robust connection, restoring channels, declarations and subscriptions). A
    service therefore starts, and stays up, while RabbitMQ is down; :meth:`Broker.wait_ready`
    waits for the first connection and :attr:`Broker.ready` tells whether it is connected now.

Publishing
    :meth:`Broker.publish` sends a JSON body on a channel with publisher confirms, as a
    persistent message, with ``mandatory=True``: it returns only once the broker has the
    message, and raises :class:`PublishError` when the broker refuses it or cannot route it,
    when the exchange is not in the topology, or when the broker stays unreachable for
    ``PUBLISH_TIMEOUT_S``. Callers decide what an unsent message becomes (the worker keeps it
    on disk, the dispatcher leaves the run unqueued for its sweep).

Consuming with :meth:`Broker.consume`: the one ack policy (all of it in ``_handle``)
    * The body is validated with :data:`shared.messages.ANY_MESSAGE`. Invalid JSON, a schema
      failure, or a kind the consumer does not ``accept`` → ``reject(requeue=False)``, so the
      message goes to the ``dead`` queue; the reason is logged (``broker.dead_lettered``).
    * The handler returns → ``ack`` (so a handler that commits a transaction acks only after
      the commit).
    * The handler raises :class:`shared.errors.MessageError` → dead-lettered as above.
    * The handler raises an *outage* (:func:`shared.outage.is_outage`: PostgreSQL, RabbitMQ or
      storage unreachable or restarting) → the message is kept and the handler called again
      after a back-off (0.5 s doubling, at most 30 s), for as long as the outage lasts. It is
      never counted and never dead-lettered: the work is fine, a dependency is not. While
      every slot waits, nothing more is taken from the queue: back-pressure for free.
    * The handler raises anything else (a bug, a constraint violation) → after a back-off the
      message is *republished* to the same queue with the header ``x-oa-retries``
      incremented, then the original is acked; once ``x-oa-retries`` reaches ``max_retries``
      (default 5) the message is dead-lettered with the last error. We republish rather than
      ``nack(requeue=True)`` because a requeued message comes back unchanged, so nothing could
      count its failures (``x-delivery-count`` exists only on quorum queues). The count travels
      with the message, not in a process.
    * The channel of a message closes (broker restart) → RabbitMQ redelivers it; the handler
      of the old delivery stops retrying and its settlement is skipped. Consumers are
      idempotent, so a redelivered message that was in fact handled changes nothing.
    * The consumer is cancelled → messages whose handler is still running (or waiting to try
      again) are ``nack``-ed with requeue; a settlement already decided is shielded from the
      cancellation and completes.
    A consumer runs up to ``prefetch`` handlers at once (``Broker(prefetch=...)``), so with
    ``prefetch > 1`` two messages of one queue may be handled out of order.

Taking work with :class:`shared.feed.TaskFeed`: the worker's policy for tasks
    A run lasts up to hours, longer than RabbitMQ's ``consumer_timeout`` (30 minutes by
    default), after which the broker would close the channel of a consumer holding an unacked
    message. So a task is acknowledged when the worker *starts* it, and what protects the run
    from then on is its lease in PostgreSQL: ``before_ack`` (the worker's first heartbeat
    naming the run, confirmed by the broker) is published before the ack, so there is no
    moment when a taken task is neither in the queue nor known to be running. A worker that
    dies before the ack gives the task back to the queue (unacked); after it, the run's lease
    expires and the dequeuer queues it again (see ``services/dequeuer/recovery.py``).
    The feed subscribes (``basic.consume``) only while it has a free slot and cancels its
    subscription when all are taken, so a busy worker never hoards tasks another could start,
    the broker's consumer count shows the workers ready for work, and a new task reaches an
    idle worker at once instead of at its next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
    ConsumerTag,
)
from aio_pika.connection import make_url
from pydantic import ValidationError

from shared import metrics
from shared.errors import BrokerError, MessageError
from shared.messages import (
    ANY_MESSAGE,
    Done,
    Due,
    Heartbeat,
    Message,
    Returned,
    Task,
)
from shared.outage import Backoff, is_outage
from shared.topology import (
    TOPOLOGY_EXCHANGES,
    declare_topology,
    queue_arguments,
    retire_legacy_tasks_queue,
    task_priority,
)

log = structlog.get_logger(__name__)

AnyMessageModel = Task | Done | Due | Heartbeat | Returned
M = TypeVar("M", bound=Message)

#: Header carrying how many times a message has been republished after a failure of its own.
RETRIES_HEADER = "x-oa-retries"
DEFAULT_MAX_RETRIES = 5
RETRY_DELAY_S = 0.5
RETRY_DELAY_MAX_S = 30.0
#: Pause between reconnection attempts of the robust connection.
RECONNECT_INTERVAL_S = 2.0
#: How long publish() waits for a reconnecting broker and for its confirmation.
PUBLISH_TIMEOUT_S = 10.0
#: How long close() lets consumers finish unsubscribing before cancelling them.
CLOSE_GRACE_S = 5.0

class PublishError(BrokerError):
    """The broker did not accept a message: refused (nack), unroutable, or unreachable."""


def retry_delay_s(retries: int) -> float:
    """Back-off before the ``retries``-th republish (0-based)."""
    return float(min(RETRY_DELAY_S * (2**retries), RETRY_DELAY_MAX_S))


def decode(body: bytes) -> AnyMessageModel:
    """Validate a message body; raises :class:`MessageError` with the reason."""
    try:
        return ANY_MESSAGE.validate_json(body)
    except ValidationError as exc:
        # The first error is enough to see what is wrong and keeps the log line short.
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise MessageError(f"invalid message: {where}: {first['msg']}") from exc


def _retries_of(message: AbstractIncomingMessage) -> int:
    value = (message.headers or {}).get(RETRIES_HEADER, 0)
    try:
        return max(int(value), 0)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0


def accepted(message: AbstractIncomingMessage, accept: tuple[type[M], ...]) -> M:
    model = decode(message.body)
    if not isinstance(model, accept):
        names = ", ".join(sorted(cls.__name__ for cls in accept))
        raise MessageError(f"kind {model.kind!r} not accepted here (accepts {names})")
    return model


def _channel_closed(message: AbstractIncomingMessage) -> bool:
    """Whether the channel ``message`` came on is gone (RabbitMQ redelivers it then)."""
    channel = getattr(message, "channel", None)
    return bool(getattr(channel, "is_closed", False))


class Broker:
    """A connection to RabbitMQ that reconnects by itself, with the oa-machine topology.

    ``prefetch`` is how many messages each :meth:`consume` handles at once. Create it and call
    :meth:`start` (or use :meth:`connect`, which also waits for the first connection).
    """

    def __init__(self, url: str, *, prefetch: int = 1) -> None:
        self._url = url
        self._prefetch = prefetch
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractRobustChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._opened = asyncio.Event()
        self._closed = asyncio.Event()
        self._opener: asyncio.Task[None] | None = None
        self._depth_channel: AbstractRobustChannel | None = None
        #: Tasks running consume() or feeds, so close() can let them unsubscribe cleanly first.
        self._consumers: set[asyncio.Task[Any]] = set()
        #: Things to close before the connection (the worker's feed), see :meth:`track`.
        self._closables: set[Any] = set()
        #: Called (without arguments) after each reconnection, e.g. to flush an outbox.
        self.on_reconnect: list[Callable[[], None]] = []
        #: ``time.monotonic()`` of the last sign of an outage seen here: a lost connection, or a
        #: handler that had to wait for a dependency. The dequeuer waits for a quiet spell after
        #: it before it presumes runs lost (their heartbeats may still be on their way).
        self.last_trouble_at: float = time.monotonic()

    @classmethod
    async def connect(cls, url: str, *, prefetch: int = 1) -> Broker:
        """A started broker, once its first connection is made and the topology declared."""
        broker = cls(url, prefetch=prefetch)
        broker.start()
        try:
            await broker.wait_ready()
        except BaseException:
            await broker.close()
            raise
        return broker

    def start(self) -> None:
        """Begin connecting in the background; returns at once."""
        if self._opener is None:
            self._opener = asyncio.create_task(self._open())

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait until the first connection is made (``TimeoutError`` after ``timeout_s``)."""
        self.start()
        opened = asyncio.ensure_future(self._opened.wait())
        waiting: set[asyncio.Future[Any]] = {opened}
        if self._opener is not None:
            waiting.add(self._opener)
        try:
            await asyncio.wait(waiting, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            opened.cancel()
        if self._opener is not None and self._opener.done() and not self._opened.is_set():
            self._opener.result()  # raises what stopped it
            raise BrokerError("the broker was closed before it connected")
        if not self._opened.is_set():
            raise TimeoutError(f"RabbitMQ not reachable within {timeout_s:g} s")

    @property
    def ready(self) -> bool:
        """Connected now, with the publishing channel open (for readiness probes)."""
        connection, channel = self._connection, self._publish_channel
        return bool(
            connection is not None and not connection.is_closed and connection.connected.is_set()
            and channel is not None and not channel.is_closed
        )

    async def _open(self) -> None:
        backoff = Backoff(first_s=0.5, max_s=RECONNECT_INTERVAL_S * 5)
        while not self._closed.is_set():
            # Made here rather than by connect_robust() so that a failed first attempt can be
            # closed (an unclosed connection object warns when collected).
            connection: AbstractRobustConnection = aio_pika.RobustConnection(
                make_url(self._url), reconnect_interval=RECONNECT_INTERVAL_S
            )
            try:
                await connection.connect()
                channel = await connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                self._exchanges = await declare_topology(channel)
                await retire_legacy_tasks_queue(connection)
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    await connection.close()
                if not isinstance(exc, Exception) or not is_outage(exc):
                    raise
                delay_s = backoff.next_delay_s()
                self.last_trouble_at = time.monotonic()
                log.warning("broker.unavailable", error=repr(exc), retry_in_s=round(delay_s, 1))
                metrics.DEPENDENCY_ERRORS.labels("rabbitmq").inc()
                await asyncio.sleep(delay_s)
                continue
            connection.reconnect_callbacks.add(self._reconnected)
            self._connection, self._publish_channel = connection, channel
            self._opened.set()
            log.info("broker.connected")
            return

    def _reconnected(self, *_: Any) -> None:
        self.last_trouble_at = time.monotonic()
        metrics.RECONNECTS.labels("rabbitmq").inc()
        log.info("broker.reconnected")
        for callback in list(self.on_reconnect):
            try:
                callback()
            except Exception:  # a listener's bug must not stop the others
                log.exception("broker.reconnect_callback_failed")

    def _require_connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise PublishError("broker unavailable: not connected yet")
        return self._connection

    async def publish(
        self, exchange: str, routing_key: str, message: Message, *, priority: int | None = None
    ) -> None:
        """Publish ``message`` persistently; returns once the broker has confirmed it.

        A task goes with its priority (:func:`shared.topology.task_priority`) unless
        ``priority`` says otherwise. Raises :class:`PublishError` if the broker refuses it,
        cannot route it, or is gone.
        """
        kind = str(getattr(message, "kind", type(message).__name__.lower()))
        if priority is None and isinstance(message, Task):
            priority = task_priority(message)
        amqp_message = aio_pika.Message(
            body=message.model_dump_json().encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=uuid.uuid4().hex,
            type=kind,
            timestamp=message.sent_at,
            priority=priority,
        )
        await self._publish_raw(exchange, routing_key, amqp_message)
        log.debug("broker.published", exchange=exchange, routing_key=routing_key, kind=kind)

    async def publish_raw(
        self, exchange: str, routing_key: str, amqp_message: aio_pika.Message
    ) -> None:
        """Publish an AMQP message as it is (tools that move messages between queues)."""
        await self._publish_raw(exchange, routing_key, amqp_message)

    async def channel(self) -> AbstractRobustChannel:
        """A new channel of this connection (tools); close it when done."""
        await self._opened.wait()
        return await self._require_connection().channel()

    async def _publish_raw(
        self, exchange: str, routing_key: str, amqp_message: aio_pika.Message
    ) -> None:
        if exchange != "" and exchange not in TOPOLOGY_EXCHANGES:
            # Publishing to a missing exchange would make the broker close the channel;
            # the topology is fixed, so a name outside it is a bug worth a clear error.
            raise PublishError(f"unknown exchange {exchange!r}: not in the topology")
        try:
            await asyncio.wait_for(self._opened.wait(), PUBLISH_TIMEOUT_S)
            channel = self._publish_channel
            assert channel is not None
            target = channel.default_exchange if exchange == "" else self._exchanges[exchange]
            # After a connection loss the robust channel reopens in the background; wait for
            # it rather than fail at once.
            await asyncio.wait_for(channel.ready(), PUBLISH_TIMEOUT_S)
            await target.publish(
                amqp_message, routing_key, mandatory=True, timeout=PUBLISH_TIMEOUT_S
            )
        except aio_pika.exceptions.PublishError as exc:
            raise PublishError(f"unroutable: exchange {exchange!r} key {routing_key!r}") from exc
        except aio_pika.exceptions.DeliveryError as exc:
            raise PublishError(f"refused by the broker: exchange {exchange!r}") from exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Any error of the client while the connection is down, including aiormq's own
            # RuntimeErrors (ChannelInvalidStateError), means "not published now".
            raise PublishError(f"broker unavailable: {exc!r}") from exc

    # --- at-least-once consumers ---------------------------------------------------------

    async def consume(
        self,
        queue: str,
        handler: Callable[[M], Awaitable[None]],
        *,
        accept: tuple[type[M], ...],
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> None:
        """Handle the messages of ``queue`` until cancelled or the broker is closed.

        ``accept`` lists the message classes this consumer handles; anything else is
        dead-lettered. See the module docstring for the ack policy. Never raises because of a
        message or an outage; handlers run up to ``prefetch`` at a time.
        """
        current = asyncio.current_task()
        if current is not None:
            self._consumers.add(current)
        try:
            await self._consume(queue, handler, accept, max_retries)
        finally:
            if current is not None:
                self._consumers.discard(current)

    async def _consume(
        self,
        queue: str,
        handler: Callable[[M], Awaitable[None]],
        accept: tuple[type[M], ...],
        max_retries: int,
    ) -> None:
        await self._opened.wait()
        in_flight: set[asyncio.Task[None]] = set()
        bound = log.bind(queue=queue)
        channel, amqp_queue = await self.subscription_channel(queue, self._prefetch)
        held = metrics.UNACKED.labels(queue)

        async def on_message(message: AbstractIncomingMessage) -> None:
            held.inc()
            task = asyncio.create_task(self._handle(queue, message, handler, accept, max_retries))
            in_flight.add(task)

            def finished(done: asyncio.Task[None]) -> None:
                in_flight.discard(done)
                held.dec()

            task.add_done_callback(finished)

        tag: ConsumerTag | None = None
        try:
            tag = await _retrying(lambda: amqp_queue.consume(on_message), self._closed, "consume")
            bound.info("broker.consuming")
            await self._closed.wait()
        finally:
            if tag is not None:
                await quietly(amqp_queue.cancel(tag))
            for task in list(in_flight):
                task.cancel()
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)
            await quietly(channel.close())
            bound.info("broker.stopped_consuming")

    def track(self, closable: Any) -> None:
        """Close ``closable`` (anything with an async ``close()``) when the broker closes."""
        self._closables.add(closable)

    def untrack(self, closable: Any) -> None:
        """Undo :meth:`track`."""
        self._closables.discard(closable)

    async def wait_opened(self) -> None:
        """Wait for the first connection (without a time limit)."""
        await self._opened.wait()

    async def subscription_channel(
        self, queue: str, prefetch: int
    ) -> tuple[AbstractRobustChannel, AbstractQueue]:
        """A robust channel of its own with ``prefetch`` and ``queue`` declared on it."""

        async def open_channel() -> tuple[AbstractRobustChannel, AbstractQueue]:
            channel = await self._require_connection().channel()
            await channel.set_qos(prefetch_count=prefetch)
            # Declared, not only looked up: after a broker that lost its data comes back, the
            # robust channel re-declares it.
            amqp_queue = await channel.declare_queue(
                queue, durable=True, arguments=queue_arguments(queue)
            )
            return channel, amqp_queue

        return await _retrying(open_channel, self._closed, "open_channel")

    async def _handle(
        self,
        queue: str,
        message: AbstractIncomingMessage,
        handler: Callable[[M], Awaitable[None]],
        accept: tuple[type[M], ...],
        max_retries: int,
    ) -> None:
        """The one place that acks, retries or dead-letters a consumed message."""
        bound = log.bind(queue=queue, message_id=message.message_id, kind=message.type)
        settled = False
        try:
            try:
                model = accepted(message, accept)
            except MessageError as exc:
                settled = True
                await self._dead_letter(queue, message, bound, str(exc))
                return
            bound = bound.bind(kind=getattr(model, "kind", message.type), **ids_of(model))
            backoff = Backoff()
            while True:
                try:
                    await handler(model)
                except MessageError as exc:
                    settled = True
                    await self._dead_letter(queue, message, bound, str(exc))
                    return
                except Exception as exc:
                    if is_outage(exc):
                        self.last_trouble_at = time.monotonic()
                        if _channel_closed(message):
                            # RabbitMQ gives the message to a consumer again: let it.
                            bound.warning("broker.redelivery_left", error=repr(exc))
                            settled = True
                            return
                        delay_s = backoff.next_delay_s()
                        if backoff.failures == 1 or backoff.failures % 10 == 0:
                            bound.warning("broker.handler_waiting", error=repr(exc),
                                          tries=backoff.failures, retry_in_s=round(delay_s, 1))
                        metrics.DEPENDENCY_ERRORS.labels(_dependency_of(exc)).inc()
                        # Cancelled while waiting: the outer handler requeues the message.
                        await asyncio.sleep(delay_s)
                        continue
                    await self._count_failure(queue, message, bound, exc, max_retries)
                    settled = True
                    return
                break
            # Shielded, as every settling call: once the handler has done its work, a
            # cancellation arriving now must not turn the ack into a redelivery.
            settled = True
            await asyncio.shield(message.ack())
        except asyncio.CancelledError:
            if not settled:
                # Give the message back for another consumer; shielded so that our own
                # cancellation cannot interrupt the nack.
                with contextlib.suppress(Exception):
                    await asyncio.shield(message.nack(requeue=True))
            raise
        except Exception as exc:
            # Only acking/rejecting can land here (the channel is gone): RabbitMQ will redeliver
            # the unacked message, so logging is all there is to do.
            bound.warning("broker.settle_failed", error=repr(exc))

    async def _count_failure(
        self, queue: str, message: AbstractIncomingMessage, bound: Any, exc: Exception,
        max_retries: int,
    ) -> None:
        """A failure of the work itself: republish with the count, or dead-letter at the end."""
        retries = _retries_of(message)
        if retries >= max_retries:
            reason = f"failed {retries + 1} times, last error: {exc!r}"
            await self._dead_letter(queue, message, bound, reason)
            return
        delay_s = retry_delay_s(retries)
        bound.warning("broker.handler_failed", error=repr(exc), retries=retries, delay_s=delay_s)
        await asyncio.sleep(delay_s)
        await asyncio.shield(self._republish(queue, message, bound, retries + 1))

    async def _dead_letter(
        self, queue: str, message: AbstractIncomingMessage, bound: Any, reason: str
    ) -> None:
        bound.warning("broker.dead_lettered", reason=reason)
        metrics.DEAD_LETTERED.labels(queue).inc()
        await asyncio.shield(message.reject(requeue=False))

    async def _republish(
        self, queue: str, message: AbstractIncomingMessage, bound: Any, retries: int
    ) -> None:
        """Put a copy carrying the new retry count at the back of ``queue``, then ack."""
        headers = dict(message.headers or {})
        headers[RETRIES_HEADER] = retries
        copy = aio_pika.Message(
            body=message.body,
            headers=headers,
            content_type=message.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message.message_id,
            type=message.type,
            timestamp=message.timestamp,
            priority=message.priority,
        )
        try:
            # The default exchange routes by queue name: straight back to this queue.
            await self._publish_raw("", queue, copy)
        except PublishError as exc:
            bound.warning("broker.retry_publish_failed", error=repr(exc))
            await message.nack(requeue=True)
            return
        await message.ack()

    # --- tools -----------------------------------------------------------------------------

    async def get(self, queue: str, *, timeout_s: float = 5.0) -> AnyMessageModel | None:
        """Wait up to ``timeout_s`` for one message of ``queue``, ack it and return it.

        For tests and tools. An invalid message is dead-lettered and raises
        :class:`MessageError`.
        """
        await self._opened.wait()
        channel = await self._require_connection().channel()
        try:
            amqp_queue = await channel.get_queue(queue, ensure=True)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while True:
                message = await amqp_queue.get(no_ack=False, fail=False)
                if message is not None:
                    break
                if loop.time() >= deadline:
                    return None
                await asyncio.sleep(min(0.05, max(deadline - loop.time(), 0)))
            try:
                model = decode(message.body)
            except MessageError as exc:
                await self._dead_letter(queue, message, log.bind(queue=queue), str(exc))
                raise
            await message.ack()
            return model
        finally:
            await channel.close()

    async def queue_depth(self, queue: str) -> tuple[int, int]:
        """``(messages ready, consumers)`` of ``queue``, by passive declaration."""
        await self._opened.wait()
        # One channel kept for these: the dequeuer asks after every settled batch. A passive
        # declare of a missing queue closes it; it is opened again on the next call.
        if self._depth_channel is None or self._depth_channel.is_closed:
            self._depth_channel = await self._require_connection().channel()
        try:
            # robust=False: a robust channel answers a passive declare of a queue it declared
            # before from its cache, with the counts of that time.
            declared = await self._depth_channel.declare_queue(queue, passive=True,
                                                               robust=False)
        except Exception:
            with contextlib.suppress(Exception):
                await self._depth_channel.close()
            self._depth_channel = None
            raise
        result = declared.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)

    async def purge(self, queue: str) -> int:
        """Drop every ready message of ``queue`` (tests, operators); returns how many."""
        await self._opened.wait()
        channel = await self._require_connection().channel()
        try:
            amqp_queue = await channel.get_queue(queue, ensure=True)
            result = await amqp_queue.purge()
            return int(result.message_count or 0)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def close(self) -> None:
        """Stop every consumer and feed, and close the connection."""
        self._closed.set()
        for closable in list(self._closables):
            await closable.close()
        # Let consume() loops see the flag and cancel their subscriptions while the connection
        # is still open; one stuck in a handler is cancelled after a grace period.
        consumers = {task for task in self._consumers if task is not asyncio.current_task()}
        if consumers:
            _done, pending = await asyncio.wait(consumers, timeout=CLOSE_GRACE_S)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=CLOSE_GRACE_S)
        if self._opener is not None and not self._opener.done():
            self._opener.cancel()
            with contextlib.suppress(BaseException):
                await self._opener
        if self._connection is not None:
            await quietly(self._connection.close())


T = TypeVar("T")


async def _retrying(
    attempt: Callable[[], Awaitable[T]], closed: asyncio.Event, what: str
) -> T:
    """``attempt()`` until it succeeds; a broker that is down is waited for, not fatal."""
    backoff = Backoff()
    while True:
        try:
            return await attempt()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if closed.is_set():
                raise
            delay_s = backoff.next_delay_s()
            log.warning("broker.retrying", what=what, error=repr(exc),
                        retry_in_s=round(delay_s, 1))
            await asyncio.sleep(delay_s)


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def quietly(awaitable: Awaitable[Any]) -> None:
    """Await a clean-up step, ignoring its failure (the channel may already be gone)."""
    try:
        await asyncio.wait_for(awaitable, CLOSE_GRACE_S)
    except asyncio.CancelledError:
        # A closing connection cancels its pending RPCs; only our own cancellation counts.
        if _cancelling():
            raise
    except Exception as exc:
        log.debug("broker.cleanup_failed", error=repr(exc))


def _dependency_of(exc: BaseException) -> str:
    module = type(exc).__module__
    if module.startswith("asyncpg"):
        return "postgresql"
    if module.startswith(("aiormq", "aio_pika", "shared.broker")):
        return "rabbitmq"
    return "other"


def ids_of(model: Message) -> dict[str, Any]:
    # Bind the identifiers that exist on this kind of message, for log correlation.
    return {
        name: getattr(model, name)
        for name in ("run_id", "job_id", "attempt", "worker")
        if getattr(model, name, None) is not None
    }

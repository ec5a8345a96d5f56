"""RabbitMQ: topology, confirmed persistent publishing, and consuming with one ack policy.

Topology (declared by :meth:`Broker.connect`, idempotently)::

    exchange tasks ──task──────────▶ queue tasks ┐
    exchange done  ──done, heartbeat▶ queue done  ├─ x-dead-letter-exchange: dead
    exchange due   ──due───────────▶ queue due   ┘  x-dead-letter-routing-key: dead
    exchange dead  ──dead──────────▶ queue dead

Every exchange is a durable direct exchange and every queue a durable *classic* queue: it
works the same on the RabbitMQ 3.10 of the development host and on the latest 3.x of
docker-compose's ``rabbitmq:3-management``. (Quorum queues would give ``x-delivery-count``,
but they need three nodes to be worth it and change dead-lettering semantics.)

Publishing
    :meth:`Broker.publish` sends a JSON body on a channel with publisher confirms, as a
    persistent message, with ``mandatory=True``: it returns only once the broker has the
    message, and raises :class:`PublishError` when the broker refuses it or cannot route it,
    or when the exchange is not in the topology. While the robust connection reconnects,
    publish waits for it (up to ``PUBLISH_TIMEOUT_S``) instead of failing at once.

Concurrency
    A consumer runs up to ``prefetch`` handlers at once (``Broker.connect(prefetch=...)``), so
    with ``prefetch > 1`` two messages of one queue may be handled out of order; with
    ``prefetch=1`` a queue is handled one message at a time, in order (except retried ones).

Consuming: the one ack policy (all of it in :meth:`Broker._settle`)
    * The body is validated with :data:`shared.messages.ANY_MESSAGE`. Invalid JSON, a schema
      failure, or a kind the consumer does not ``accept`` → ``reject(requeue=False)``, so the
      message goes to the ``dead`` queue; the reason is logged (``broker.dead_lettered``).
    * The handler returns → ``ack``.
    * The handler raises :class:`shared.errors.MessageError` → dead-lettered as above.
    * The handler raises anything else → a transient failure (database or broker down): after
      a back-off delay (0.5 s doubling, at most 30 s) the message is *republished* to the same
      queue with the header ``x-oa-retries`` incremented, then the original is acked. Once
      ``x-oa-retries`` reaches ``max_retries`` (default 5) the message is dead-lettered
      instead. We republish rather than ``nack(requeue=True)`` because a requeued message
      comes back unchanged, so nothing could count its failures and a poison message would
      loop for ever (``x-delivery-count`` exists only on quorum queues). The retry count
      travels with the message, not in a process. If the republish itself fails (broker
      gone) the message is ``nack``-ed with requeue, or simply left unacked: RabbitMQ
      redelivers it when the channel closes. A retried message goes to the back of its queue;
      consumers are idempotent and guard state changes in SQL, so order is not relied upon.
    * The consumer is cancelled → messages whose handler is still running (or waiting for a
      retry) are ``nack``-ed with requeue; a settlement already decided (ack, reject,
      republish) is shielded from the cancellation and completes.
    A process crash while handling a message is not counted (nothing runs after the crash):
    RabbitMQ redelivers the message, so a message that crashes the process every time would
    loop; the worker, where crashes are plausible, avoids this by acking early (below).

Ack early (``ack_early=True``): the worker's policy for tasks
    A run lasts up to hours, longer than RabbitMQ's ``consumer_timeout`` (30 minutes by
    default), after which the broker would close the channel of a consumer holding an unacked
    message. So the worker consumes ``tasks`` with ``ack_early=True``: a valid message is acked
    *before* the handler starts, and a run lost afterwards (worker killed, host gone) is
    recovered by the deadline flow: the run's ``deadline_at`` passes, a ``Due`` message is
    handled by the dequeuer, which settles or re-queues the run. In this mode handler
    exceptions are only logged. So that a busy worker does not hoard tasks other workers could
    start, an ``ack_early`` consumer does not use a push subscription (acking would let the
    broker push the next task while the first still runs); it pulls with ``basic.get`` only
    when one of its ``prefetch`` slots is free, polling every ``poll_interval_s`` when idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from pydantic import ValidationError

from shared.errors import BrokerError, MessageError
from shared.messages import (
    ANY_MESSAGE,
    EXCHANGE_DEAD,
    EXCHANGE_DONE,
    EXCHANGE_DUE,
    EXCHANGE_TASKS,
    QUEUE_DEAD,
    QUEUE_DONE,
    QUEUE_DUE,
    QUEUE_TASKS,
    ROUTE_DEAD,
    ROUTE_DONE,
    ROUTE_DUE,
    ROUTE_HEARTBEAT,
    ROUTE_TASK,
    Done,
    Due,
    Heartbeat,
    Message,
    Task,
)

log = structlog.get_logger(__name__)

AnyMessageModel = Task | Done | Due | Heartbeat
M = TypeVar("M", bound=Message)

#: Header carrying how many times a message has been republished after a transient failure.
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

_DEAD_LETTER_ARGS: dict[str, Any] = {
    "x-dead-letter-exchange": EXCHANGE_DEAD,
    "x-dead-letter-routing-key": ROUTE_DEAD,
}

#: queue -> (exchange, routing keys bound, dead-lettered?)
TOPOLOGY: dict[str, tuple[str, tuple[str, ...], bool]] = {
    QUEUE_TASKS: (EXCHANGE_TASKS, (ROUTE_TASK,), True),
    QUEUE_DONE: (EXCHANGE_DONE, (ROUTE_DONE, ROUTE_HEARTBEAT), True),
    QUEUE_DUE: (EXCHANGE_DUE, (ROUTE_DUE,), True),
    QUEUE_DEAD: (EXCHANGE_DEAD, (ROUTE_DEAD,), False),
}


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


class Broker:
    """A robust connection to RabbitMQ with the oa-machine topology declared."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        publish_channel: AbstractRobustChannel,
        exchanges: dict[str, AbstractExchange],
        prefetch: int,
    ) -> None:
        self._connection = connection
        self._publish_channel = publish_channel
        self._exchanges = exchanges
        self._prefetch = prefetch
        self._closed = asyncio.Event()
        #: Tasks running consume(), so close() can let them unsubscribe cleanly first.
        self._consumers: set[asyncio.Task[Any]] = set()

    @classmethod
    async def connect(cls, url: str, *, prefetch: int = 1) -> Broker:
        """Connect (reconnecting by itself later) and declare the topology.

        ``prefetch`` is how many messages each :meth:`consume` handles at once.
        """
        connection = await aio_pika.connect_robust(url, reconnect_interval=RECONNECT_INTERVAL_S)
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            exchanges = await declare_topology(channel)
        except BaseException:
            await connection.close()
            raise
        return cls(connection, channel, exchanges, prefetch)

    async def publish(self, exchange: str, routing_key: str, message: Message) -> None:
        """Publish ``message`` persistently; returns once the broker has confirmed it.

        Raises :class:`PublishError` if the broker refuses it, cannot route it, or is gone.
        """
        kind = str(getattr(message, "kind", type(message).__name__.lower()))
        amqp_message = aio_pika.Message(
            body=message.model_dump_json().encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=uuid.uuid4().hex,
            type=kind,
            timestamp=message.sent_at,
        )
        await self._publish_raw(exchange, routing_key, amqp_message)
        log.debug("broker.published", exchange=exchange, routing_key=routing_key, kind=kind)

    async def _publish_raw(
        self, exchange: str, routing_key: str, amqp_message: aio_pika.Message
    ) -> None:
        channel = self._publish_channel
        if exchange == "":
            target = channel.default_exchange
        elif exchange in self._exchanges:
            target = self._exchanges[exchange]
        else:
            # Publishing to a missing exchange would make the broker close the channel;
            # the topology is fixed, so a name outside it is a bug worth a clear error.
            raise PublishError(f"unknown exchange {exchange!r}: not in the topology")
        try:
            # After a connection loss or a channel error the robust channel reopens in the
            # background; wait for it rather than fail at once.
            await asyncio.wait_for(channel.ready(), PUBLISH_TIMEOUT_S)
            await target.publish(
                amqp_message, routing_key, mandatory=True, timeout=PUBLISH_TIMEOUT_S
            )
        except aio_pika.exceptions.PublishError as exc:
            raise PublishError(f"unroutable: exchange {exchange!r} key {routing_key!r}") from exc
        except aio_pika.exceptions.DeliveryError as exc:
            raise PublishError(f"refused by the broker: exchange {exchange!r}") from exc
        except (aio_pika.exceptions.AMQPError, ConnectionError, OSError, TimeoutError) as exc:
            raise PublishError(f"broker unavailable: {exc!r}") from exc

    async def consume(
        self,
        queue: str,
        handler: Callable[[M], Awaitable[None]],
        *,
        accept: tuple[type[M], ...],
        ack_early: bool = False,
        max_retries: int = DEFAULT_MAX_RETRIES,
        poll_interval_s: float = 1.0,
    ) -> None:
        """Handle the messages of ``queue`` until cancelled or the broker is closed.

        ``accept`` lists the message classes this consumer handles; anything else is
        dead-lettered. See the module docstring for the ack policy and ``ack_early``.
        Never raises because of a message; handlers may run ``prefetch`` at a time.
        """
        current = asyncio.current_task()
        if current is not None:
            self._consumers.add(current)
        try:
            await self._consume(queue, handler, accept, ack_early, max_retries, poll_interval_s)
        finally:
            if current is not None:
                self._consumers.discard(current)

    async def _consume(
        self,
        queue: str,
        handler: Callable[[M], Awaitable[None]],
        accept: tuple[type[M], ...],
        ack_early: bool,
        max_retries: int,
        poll_interval_s: float,
    ) -> None:
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self._prefetch)
        amqp_queue = await channel.get_queue(queue, ensure=True)
        in_flight: set[asyncio.Task[None]] = set()
        bound = log.bind(queue=queue)

        def spawn(message: AbstractIncomingMessage) -> asyncio.Task[None]:
            task = asyncio.create_task(
                self._settle(queue, message, handler, accept, ack_early, max_retries)
            )
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            return task

        try:
            if ack_early:
                await self._pull_loop(amqp_queue, spawn, in_flight, poll_interval_s)
            else:

                async def on_message(message: AbstractIncomingMessage) -> None:
                    spawn(message)

                tag = await amqp_queue.consume(on_message)
                bound.info("broker.consuming", ack_early=False)
                try:
                    await self._closed.wait()
                finally:
                    await _quietly(amqp_queue.cancel(tag))
        finally:
            for task in list(in_flight):
                task.cancel()
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)
            await _quietly(channel.close())
            bound.info("broker.stopped_consuming")

    async def _pull_loop(
        self,
        amqp_queue: AbstractQueue,
        spawn: Callable[[AbstractIncomingMessage], asyncio.Task[None]],
        in_flight: set[asyncio.Task[None]],
        poll_interval_s: float,
    ) -> None:
        log.info("broker.consuming", queue=amqp_queue.name, ack_early=True)
        while not self._closed.is_set():
            if len(in_flight) >= self._prefetch:
                await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                message = await amqp_queue.get(no_ack=False, fail=False, timeout=10)
            except (aio_pika.exceptions.AMQPError, ConnectionError, OSError, TimeoutError) as exc:
                # aiormq may turn our own cancellation into a channel error: never swallow it.
                if _cancelling():
                    raise asyncio.CancelledError from exc
                # The robust connection is reconnecting; try again a little later.
                log.warning("broker.get_failed", queue=amqp_queue.name, error=repr(exc))
                await asyncio.sleep(poll_interval_s)
                continue
            if _cancelling():
                # Python 3.11's wait_for (inside aiormq) can swallow a cancellation that
                # arrives as the reply does: give the message back and stop as asked.
                if message is not None:
                    await _quietly(message.nack(requeue=True))
                raise asyncio.CancelledError
            if message is None:
                await asyncio.sleep(poll_interval_s)
                continue
            spawn(message)

    async def _settle(
        self,
        queue: str,
        message: AbstractIncomingMessage,
        handler: Callable[[M], Awaitable[None]],
        accept: tuple[type[M], ...],
        ack_early: bool,
        max_retries: int,
    ) -> None:
        """The one place that acks, retries or dead-letters a message."""
        bound = log.bind(queue=queue, message_id=message.message_id, kind=message.type)
        settled = False
        try:
            try:
                model = decode(message.body)
                if not isinstance(model, accept):
                    names = ", ".join(sorted(cls.__name__ for cls in accept))
                    raise MessageError(f"kind {model.kind!r} not accepted here (accepts {names})")
            except MessageError as exc:
                settled = True
                await self._dead_letter(message, bound, str(exc))
                return
            bound = bound.bind(kind=model.kind, **_ids(model))
            if ack_early:
                settled = True
                await asyncio.shield(message.ack())
            try:
                await handler(model)
            except MessageError as exc:
                if ack_early:
                    bound.error("broker.handler_rejected", error=str(exc))
                else:
                    settled = True
                    await self._dead_letter(message, bound, str(exc))
                return
            except Exception as exc:
                if ack_early:
                    # Already acked: the deadline flow recovers the run.
                    bound.exception("broker.handler_failed", error=repr(exc))
                    return
                retries = _retries_of(message)
                if retries >= max_retries:
                    settled = True
                    reason = f"failed {retries + 1} times, last error: {exc!r}"
                    await self._dead_letter(message, bound, reason)
                    return
                delay_s = retry_delay_s(retries)
                bound.warning(
                    "broker.handler_failed", error=repr(exc), retries=retries, delay_s=delay_s
                )
                # Cancelled while waiting: the outer handler requeues the message.
                await asyncio.sleep(delay_s)
                settled = True
                await asyncio.shield(self._republish(queue, message, bound, retries + 1))
                return
            if not ack_early:
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

    async def _dead_letter(self, message: AbstractIncomingMessage, bound: Any, reason: str) -> None:
        bound.warning("broker.dead_lettered", reason=reason)
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
        )
        try:
            # The default exchange routes by queue name: straight back to this queue.
            await self._publish_raw("", queue, copy)
        except PublishError as exc:
            bound.warning("broker.retry_publish_failed", error=repr(exc))
            await message.nack(requeue=True)
            return
        await message.ack()

    async def get(self, queue: str, *, timeout_s: float = 5.0) -> AnyMessageModel | None:
        """Wait up to ``timeout_s`` for one message of ``queue``, ack it and return it.

        For tests and burst modes. An invalid message is dead-lettered and raises
        :class:`MessageError`.
        """
        channel = await self._connection.channel()
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
                await self._dead_letter(message, log.bind(queue=queue), str(exc))
                raise
            await message.ack()
            return model
        finally:
            await channel.close()

    async def queue_depth(self, queue: str) -> tuple[int, int]:
        """``(messages ready, consumers)`` of ``queue``, by passive declaration."""
        # A channel of its own: a passive declare of a missing queue closes the channel.
        channel = await self._connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
            result = declared.declaration_result
            return int(result.message_count or 0), int(result.consumer_count or 0)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def purge(self, queue: str) -> int:
        """Drop every ready message of ``queue`` (tests, operators); returns how many."""
        channel = await self._connection.channel()
        try:
            amqp_queue = await channel.get_queue(queue, ensure=True)
            result = await amqp_queue.purge()
            return int(result.message_count or 0)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def close(self) -> None:
        """Stop every :meth:`consume` and close the connection."""
        self._closed.set()
        # Let consume() loops see the flag and cancel their subscriptions while the connection
        # is still open; one stuck in a handler is cancelled after a grace period.
        consumers = {task for task in self._consumers if task is not asyncio.current_task()}
        if consumers:
            _done, pending = await asyncio.wait(consumers, timeout=CLOSE_GRACE_S)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=CLOSE_GRACE_S)
        await self._connection.close()


async def declare_topology(channel: AbstractChannel) -> dict[str, AbstractExchange]:
    """Declare every exchange, queue and binding of oa-machine; returns the exchanges."""
    exchanges: dict[str, AbstractExchange] = {}
    for queue_name, (exchange_name, routes, dead_lettered) in TOPOLOGY.items():
        exchange = await channel.declare_exchange(
            exchange_name, aio_pika.ExchangeType.DIRECT, durable=True
        )
        exchanges[exchange_name] = exchange
        queue = await channel.declare_queue(
            queue_name,
            durable=True,
            arguments=dict(_DEAD_LETTER_ARGS) if dead_lettered else None,
        )
        for route in routes:
            await queue.bind(exchange, route)
    return exchanges


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _quietly(awaitable: Awaitable[Any]) -> None:
    """Await a clean-up step, ignoring its failure (the channel may already be gone)."""
    try:
        await asyncio.wait_for(awaitable, CLOSE_GRACE_S)
    except asyncio.CancelledError:
        # A closing connection cancels its pending RPCs; only our own cancellation counts.
        if _cancelling():
            raise
    except Exception as exc:
        log.debug("broker.cleanup_failed", error=repr(exc))


def _ids(model: AnyMessageModel) -> dict[str, Any]:
    # Bind the identifiers that exist on this kind of message, for log correlation.
    return {
        name: getattr(model, name)
        for name in ("run_id", "job_id", "attempt", "worker")
        if getattr(model, name, None) is not None
    }

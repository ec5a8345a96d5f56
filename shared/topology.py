"""The RabbitMQ topology of oa-machine, declared idempotently by every process that connects.

::

    exchange tasks ──task──────────────────────▶ queue tasks.priority ┐
    exchange done  ──done, heartbeat, returned─▶ queue done           ├─ dead-lettered to `dead`
    exchange due   ──due───────────────────────▶ queue due            ┘
    exchange dead  ──dead──────────────────────▶ queue dead

Every exchange is a durable direct exchange and every queue a durable *classic* queue: it
works the same on the RabbitMQ 3.10 of the development host and on the latest 3.x of
docker-compose's ``rabbitmq:3-management``. (Quorum queues would give ``x-delivery-count``,
but they need three nodes to be worth it and change dead-lettering semantics.)

The tasks queue is a *priority* queue (``x-max-priority``): a task of a pull request or a push
(:data:`PRIORITY_JOB`) is delivered before the batch set's tasks already waiting
(:data:`PRIORITY_BATCH`), so a contributor does not wait for the weekly set. A queue's
arguments cannot change once declared, so the priority queue has a name of its own; the queue
of earlier versions, ``tasks``, is retired by :func:`retire_legacy_tasks_queue`: unbound first
(no new task reaches it), its waiting tasks moved over, then deleted once empty. Any number of
processes may do this at once: a task moved twice is run twice at most, and the dequeuer settles
each attempt once.
"""

from __future__ import annotations

from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

from shared.messages import (
    ANY_MESSAGE,
    EXCHANGE_DEAD,
    EXCHANGE_DONE,
    EXCHANGE_DUE,
    EXCHANGE_TASKS,
    LEGACY_QUEUE_TASKS,
    QUEUE_DEAD,
    QUEUE_DONE,
    QUEUE_DUE,
    QUEUE_TASKS,
    ROUTE_DEAD,
    ROUTE_DONE,
    ROUTE_DUE,
    ROUTE_HEARTBEAT,
    ROUTE_RETURNED,
    ROUTE_TASK,
    Task,
)

log = structlog.get_logger(__name__)

#: Priorities of tasks (AMQP message priority, 0 to MAX_PRIORITY).
PRIORITY_BATCH = 1
PRIORITY_JOB = 5
MAX_PRIORITY = 5

_DEAD_LETTER_ARGS: dict[str, Any] = {
    "x-dead-letter-exchange": EXCHANGE_DEAD,
    "x-dead-letter-routing-key": ROUTE_DEAD,
}

#: queue -> (exchange, routing keys bound, dead-lettered?)
TOPOLOGY: dict[str, tuple[str, tuple[str, ...], bool]] = {
    QUEUE_TASKS: (EXCHANGE_TASKS, (ROUTE_TASK,), True),
    QUEUE_DONE: (EXCHANGE_DONE, (ROUTE_DONE, ROUTE_HEARTBEAT, ROUTE_RETURNED), True),
    QUEUE_DUE: (EXCHANGE_DUE, (ROUTE_DUE,), True),
    QUEUE_DEAD: (EXCHANGE_DEAD, (ROUTE_DEAD,), False),
}

#: Exchanges messages may be published to (the default exchange "" routes by queue name).
TOPOLOGY_EXCHANGES = frozenset(exchange for exchange, _routes, _dl in TOPOLOGY.values())


def queue_arguments(queue: str) -> dict[str, Any] | None:
    """The arguments ``queue`` is declared with (every declaration must use the same)."""
    _exchange, _routes, dead_lettered = TOPOLOGY[queue]
    arguments: dict[str, Any] = dict(_DEAD_LETTER_ARGS) if dead_lettered else {}
    if queue == QUEUE_TASKS:
        arguments["x-max-priority"] = MAX_PRIORITY
    return arguments or None


def task_priority(task: Task) -> int:
    """Pull requests and pushes before batch sets."""
    return PRIORITY_BATCH if task.job_id is None and task.set_id is not None else PRIORITY_JOB


async def declare_topology(channel: AbstractChannel) -> dict[str, AbstractExchange]:
    """Declare every exchange, queue and binding of oa-machine; returns the exchanges."""
    exchanges: dict[str, AbstractExchange] = {}
    for queue_name, (exchange_name, routes, _dead_lettered) in TOPOLOGY.items():
        exchange = await channel.declare_exchange(
            exchange_name, aio_pika.ExchangeType.DIRECT, durable=True
        )
        exchanges[exchange_name] = exchange
        queue = await channel.declare_queue(
            queue_name, durable=True, arguments=queue_arguments(queue_name)
        )
        for route in routes:
            await queue.bind(exchange, route)
    return exchanges


async def retire_legacy_tasks_queue(connection: AbstractConnection) -> int:
    """Move the tasks waiting in the queue of earlier versions over, then delete it.

    Returns how many tasks were moved. Does nothing when that queue does not exist.
    """
    probe = await connection.channel()
    try:
        legacy = await probe.declare_queue(LEGACY_QUEUE_TASKS, passive=True)
    except aio_pika.exceptions.ChannelClosed:
        return 0  # not there: a new installation, or retired already
    finally:
        if not probe.is_closed:
            await probe.close()
    channel = await connection.channel(publisher_confirms=True)
    moved = 0
    try:
        legacy = await channel.declare_queue(LEGACY_QUEUE_TASKS, passive=True)
        exchange = await channel.get_exchange(EXCHANGE_TASKS)
        # First, no new task may reach the old queue.
        await legacy.unbind(exchange, ROUTE_TASK)
        while (message := await legacy.get(no_ack=False, fail=False)) is not None:
            priority = PRIORITY_JOB
            try:
                model = ANY_MESSAGE.validate_json(message.body)
                if isinstance(model, Task):
                    priority = task_priority(model)
            except Exception:  # not a task: the new queue's consumer dead-letters it
                log.warning("broker.legacy_message_unreadable", message_id=message.message_id)
            await exchange.publish(
                aio_pika.Message(
                    body=message.body, headers=message.headers,
                    content_type=message.content_type, delivery_mode=message.delivery_mode,
                    message_id=message.message_id, type=message.type,
                    timestamp=message.timestamp, priority=priority,
                ),
                ROUTE_TASK, mandatory=True,
            )
            await message.ack()
            moved += 1
        try:
            await legacy.delete(if_unused=False, if_empty=True)
        except aio_pika.exceptions.AMQPError as exc:
            # Another process is still emptying it, or a consumer of an older version is
            # attached: the next start finishes the job.
            log.info("broker.legacy_queue_kept", error=repr(exc))
    finally:
        if not channel.is_closed:
            await channel.close()
    if moved:
        log.info("broker.legacy_tasks_moved", moved=moved, into=QUEUE_TASKS)
    return moved

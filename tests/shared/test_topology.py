"""The topology on the real RabbitMQ: task priorities; retiring the queue of earlier versions."""

from __future__ import annotations

import asyncio

import aio_pika

from shared.broker import Broker
from shared.feed import TaskFeed
from shared.messages import (
    EXCHANGE_TASKS,
    LEGACY_QUEUE_TASKS,
    QUEUE_TASKS,
    ROUTE_TASK,
    Task,
)
from shared.topology import PRIORITY_BATCH, PRIORITY_JOB, task_priority


def task(run_id: int, *, job: bool) -> Task:
    return Task(run_id=run_id, job_id=1 if job else None, set_id=None if job else 9,
                source_path="sources/x.json", layer="addresses", entry_name="e",
                source={"schema": 2})


def test_pull_requests_and_pushes_go_before_batch_sets() -> None:
    assert task_priority(task(1, job=True)) == PRIORITY_JOB > PRIORITY_BATCH
    assert task_priority(task(2, job=False)) == PRIORITY_BATCH


async def test_a_job_task_overtakes_the_batch_tasks_waiting(broker: Broker) -> None:
    for run_id in range(1, 6):
        await broker.publish(EXCHANGE_TASKS, ROUTE_TASK, task(run_id, job=False))
    await broker.publish(EXCHANGE_TASKS, ROUTE_TASK, task(99, job=True))

    async def before_ack(_: Task) -> None:
        return None

    feed = TaskFeed(broker, QUEUE_TASKS, (Task,), capacity=1, before_ack=before_ack)
    taken = []
    try:
        for _ in range(6):
            taken.append((await asyncio.wait_for(feed.next(), 10)).run_id)
            feed.release()
    finally:
        await feed.close()
    assert taken == [99, 1, 2, 3, 4, 5]


async def test_the_queue_of_earlier_versions_is_emptied_into_the_new_one_and_deleted(
    amqp_url: str, broker: Broker
) -> None:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(EXCHANGE_TASKS)
        legacy = await channel.declare_queue(LEGACY_QUEUE_TASKS, durable=True)
        await legacy.bind(exchange, ROUTE_TASK)
        # Tasks an older worker pool left waiting (published while both queues were bound).
        for run_id, job in ((1, False), (2, False), (3, True)):
            await legacy.channel.default_exchange.publish(
                aio_pika.Message(task(run_id, job=job).model_dump_json().encode(),
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT, type="task"),
                routing_key=LEGACY_QUEUE_TASKS)
        await broker.purge(QUEUE_TASKS)
    finally:
        await connection.close()

    upgraded = await Broker.connect(amqp_url)  # what a process of the new version does at start
    try:
        moved = [await upgraded.get(QUEUE_TASKS) for _ in range(3)]
        assert [m.run_id for m in moved if isinstance(m, Task)] == [3, 1, 2]  # by priority
        probe_connection = await aio_pika.connect(amqp_url)
        try:
            probe = await probe_connection.channel()
            try:
                await probe.declare_queue(LEGACY_QUEUE_TASKS, passive=True)
                gone = False
            except aio_pika.exceptions.ChannelClosed:
                gone = True
        finally:
            await probe_connection.close()
        assert gone, "the old queue is deleted once empty"
    finally:
        await upgraded.close()

"""shared.broker against the real RabbitMQ server, on the session's virtual host."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

import shared.broker
from shared.broker import RETRIES_HEADER, Broker, PublishError
from shared.errors import MessageError
from shared.messages import (
    EXCHANGE_DONE,
    EXCHANGE_DUE,
    EXCHANGE_TASKS,
    QUEUE_DEAD,
    QUEUE_DONE,
    QUEUE_DUE,
    QUEUE_TASKS,
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

WAIT_S = 10.0


def make_task(run_id: int = 1) -> Task:
    return Task(
        run_id=run_id,
        job_id=7,
        source_path="sources/us/ca/berkeley.json",
        layer="addresses",
        entry_name="city",
        commit_sha="abc123",
        source={"schema": 2, "layers": {"addresses": [{"name": "city"}]}},
        timeout_s=3600,
    )


def make_done(run_id: int = 1) -> Done:
    return Done(
        run_id=run_id,
        worker="w-1",
        status="failure",
        source_problem="download_failed",
        error="HTTP 404",
        outputs={"index.json": f"runs/{run_id}/index.json"},
        state={"rows": 0},
        started_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the transient-failure back-off short so the suite stays quick."""
    monkeypatch.setattr(shared.broker, "RETRY_DELAY_S", 0.05)


@pytest.fixture
async def raw_channel(amqp_url: str) -> AsyncIterator[AbstractChannel]:
    """A plain aio-pika channel, to publish bad messages and inspect queues."""
    connection = await aio_pika.connect(amqp_url)
    try:
        yield await connection.channel()
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def consuming(
    broker: Broker,
    queue: str,
    handler: Callable[[Any], Awaitable[None]],
    **options: Any,
) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``broker.consume`` in the background for the duration of the block."""
    options.setdefault("accept", (Task, Done, Due, Heartbeat))
    task = asyncio.create_task(broker.consume(queue, handler, **options))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def raw_get(channel: AbstractChannel, queue: str) -> aio_pika.abc.AbstractIncomingMessage:
    """The next message of ``queue`` (acked), waiting a little for it to arrive."""
    amqp_queue = await channel.get_queue(queue)
    for _ in range(100):
        message = await amqp_queue.get(no_ack=True, fail=False)
        if message is not None:
            return message
        await asyncio.sleep(0.05)
    raise AssertionError(f"no message in {queue}")


async def wait_depth(broker: Broker, queue: str, ready: int) -> None:
    for _ in range(100):
        if (await broker.queue_depth(queue))[0] == ready:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{queue} never had {ready} ready: {await broker.queue_depth(queue)}")


async def test_round_trip_of_every_kind(broker: Broker) -> None:
    heartbeat = Heartbeat(worker="w-1", hostname="h", pid=12, run_id=1, attempt=1, state="running")
    due = Due(run_id=3, attempt=2, deadline_at=datetime(2026, 5, 6, tzinfo=UTC))
    sent: list[tuple[str, str, str, Message]] = [
        (EXCHANGE_TASKS, ROUTE_TASK, QUEUE_TASKS, make_task()),
        (EXCHANGE_DONE, ROUTE_DONE, QUEUE_DONE, make_done()),
        (EXCHANGE_DONE, ROUTE_HEARTBEAT, QUEUE_DONE, heartbeat),
        (EXCHANGE_DUE, ROUTE_DUE, QUEUE_DUE, due),
    ]
    received: asyncio.Queue[Message] = asyncio.Queue()
    async with contextlib.AsyncExitStack() as stack:
        for queue in (QUEUE_TASKS, QUEUE_DONE, QUEUE_DUE):
            await stack.enter_async_context(consuming(broker, queue, received.put))
        for exchange, route, _queue, message in sent:
            await broker.publish(exchange, route, message)
        got = [await asyncio.wait_for(received.get(), WAIT_S) for _ in sent]
    assert sorted(got, key=repr) == sorted((message for *_, message in sent), key=repr)
    for queue in (QUEUE_TASKS, QUEUE_DONE, QUEUE_DUE, QUEUE_DEAD):
        assert (await broker.queue_depth(queue))[0] == 0


async def test_get_polls_one_message(broker: Broker) -> None:
    assert await broker.get(QUEUE_TASKS, timeout_s=0.2) is None
    task = make_task(5)
    await broker.publish(EXCHANGE_TASKS, ROUTE_TASK, task)
    assert await broker.get(QUEUE_TASKS) == task
    # get() acked it.
    assert await broker.queue_depth(QUEUE_TASKS) == (0, 0)


async def test_get_dead_letters_an_invalid_message(
    broker: Broker, raw_channel: AbstractChannel
) -> None:
    exchange = await raw_channel.get_exchange(EXCHANGE_TASKS)
    await exchange.publish(aio_pika.Message(b"[]"), ROUTE_TASK)
    with pytest.raises(MessageError):
        await broker.get(QUEUE_TASKS)
    assert (await raw_get(raw_channel, QUEUE_DEAD)).body == b"[]"


async def test_messages_are_persistent_json(broker: Broker, raw_channel: AbstractChannel) -> None:
    task = make_task(9)
    await broker.publish(EXCHANGE_TASKS, ROUTE_TASK, task)
    message = await raw_get(raw_channel, QUEUE_TASKS)
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.content_type == "application/json"
    assert message.type == "task"
    assert message.message_id
    assert Task.model_validate_json(message.body) == task


async def test_unroutable_publish_raises(broker: Broker) -> None:
    with pytest.raises(PublishError):
        await broker.publish(EXCHANGE_TASKS, "no-such-route", make_task())
    # The broker is still usable afterwards.
    await broker.publish(EXCHANGE_TASKS, ROUTE_TASK, make_task())
    assert (await broker.queue_depth(QUEUE_TASKS))[0] == 1


async def test_unknown_exchange_is_refused_without_breaking_the_channel(broker: Broker) -> None:
    with pytest.raises(PublishError, match="unknown exchange"):
        await broker.publish("no-such-exchange", ROUTE_TASK, make_task())
    await broker.publish(EXCHANGE_TASKS, ROUTE_TASK, make_task())
    assert (await broker.queue_depth(QUEUE_TASKS))[0] == 1


async def test_consumer_and_publisher_survive_a_connection_loss(
    broker: Broker, amqp_url: str
) -> None:
    received: asyncio.Queue[Task] = asyncio.Queue()
    async with consuming(broker, QUEUE_TASKS, received.put, accept=(Task,)):
        await broker.publish(EXCHANGE_TASKS, ROUTE_TASK, make_task(51))
        assert (await asyncio.wait_for(received.get(), WAIT_S)).run_id == 51
        vhost = unquote(urlsplit(amqp_url).path.lstrip("/"))
        # What a broker restart or a network cut looks like to the client.
        await asyncio.to_thread(
            subprocess.run,
            ["rabbitmqctl", "-q", "close_all_connections", "-p", vhost, "test"],
            check=True,
            capture_output=True,
        )
        # publish() waits for the reconnection; the consumer is re-subscribed by itself.
        await broker.publish(EXCHANGE_TASKS, ROUTE_TASK, make_task(52))
        assert (await asyncio.wait_for(received.get(), WAIT_S)).run_id == 52


async def test_bad_messages_are_dead_lettered(broker: Broker, raw_channel: AbstractChannel) -> None:
    exchange = await raw_channel.get_exchange(EXCHANGE_TASKS)
    await exchange.publish(aio_pika.Message(b"{not json"), ROUTE_TASK)
    await exchange.publish(aio_pika.Message(b'{"kind": "task", "run_id": "x"}'), ROUTE_TASK)
    # A valid message of the wrong kind for this queue.
    done = make_done()
    await exchange.publish(aio_pika.Message(done.model_dump_json().encode()), ROUTE_TASK)
    handled: asyncio.Queue[Task] = asyncio.Queue()
    async with consuming(broker, QUEUE_TASKS, handled.put, accept=(Task,)):
        await broker.publish(EXCHANGE_TASKS, ROUTE_TASK, make_task(42))
        got = await asyncio.wait_for(handled.get(), WAIT_S)
    assert got.run_id == 42
    assert handled.empty()
    bodies = [(await raw_get(raw_channel, QUEUE_DEAD)).body for _ in range(3)]
    assert bodies[0] == b"{not json"
    assert b'"run_id": "x"' in bodies[1]
    assert Done.model_validate_json(bodies[2]) == done
    assert (await broker.queue_depth(QUEUE_DEAD))[0] == 0


async def test_message_error_from_handler_dead_letters(
    broker: Broker, raw_channel: AbstractChannel
) -> None:
    calls: list[Due] = []

    async def handler(message: Due) -> None:
        calls.append(message)
        raise MessageError("run 3 does not exist")

    async with consuming(broker, QUEUE_DUE, handler, accept=(Due,)):
        await broker.publish(EXCHANGE_DUE, ROUTE_DUE, Due(run_id=3, deadline_at=datetime.now(UTC)))
        dead = await raw_get(raw_channel, QUEUE_DEAD)
    assert len(calls) == 1
    assert Due.model_validate_json(dead.body).run_id == 3


async def test_transient_failure_is_retried(broker: Broker) -> None:
    calls: list[Done] = []
    finished = asyncio.Event()

    async def handler(message: Done) -> None:
        calls.append(message)
        if len(calls) == 1:
            raise ConnectionError("database is down")
        finished.set()

    async with consuming(broker, QUEUE_DONE, handler, accept=(Done,)):
        await broker.publish(EXCHANGE_DONE, ROUTE_DONE, make_done(11))
        await asyncio.wait_for(finished.wait(), WAIT_S)
    assert [call.run_id for call in calls] == [11, 11]
    assert await broker.queue_depth(QUEUE_DONE) == (0, 0)
    assert (await broker.queue_depth(QUEUE_DEAD))[0] == 0


async def test_poison_message_ends_in_dead_letters(
    broker: Broker, raw_channel: AbstractChannel
) -> None:
    calls = 0

    async def handler(message: Done) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("bug")

    async with consuming(broker, QUEUE_DONE, handler, accept=(Done,), max_retries=2):
        await broker.publish(EXCHANGE_DONE, ROUTE_DONE, make_done(12))
        dead = await raw_get(raw_channel, QUEUE_DEAD)
    # First delivery plus two retries, then dead-lettered with the retry count on it.
    assert calls == 3
    assert (dead.headers or {}).get(RETRIES_HEADER) == 2
    assert Done.model_validate_json(dead.body).run_id == 12


async def test_cancelled_consumer_requeues_the_message(broker: Broker) -> None:
    started = asyncio.Event()

    async def handler(message: Done) -> None:
        started.set()
        await asyncio.sleep(3600)

    async with consuming(broker, QUEUE_DONE, handler, accept=(Done,)):
        await broker.publish(EXCHANGE_DONE, ROUTE_DONE, make_done(13))
        await asyncio.wait_for(started.wait(), WAIT_S)
        assert (await broker.queue_depth(QUEUE_DONE))[0] == 0
    await wait_depth(broker, QUEUE_DONE, 1)


async def test_ack_early_takes_one_task_per_free_slot(broker: Broker) -> None:
    started: asyncio.Queue[Task] = asyncio.Queue()

    async def handler(message: Task) -> None:
        await started.put(message)
        await asyncio.sleep(3600)  # a long run

    await broker.publish(EXCHANGE_TASKS, ROUTE_TASK, make_task(21))
    await broker.publish(EXCHANGE_TASKS, ROUTE_TASK, make_task(22))
    async with consuming(
        broker, QUEUE_TASKS, handler, accept=(Task,), ack_early=True, poll_interval_s=0.05
    ):
        first = await asyncio.wait_for(started.get(), WAIT_S)
        await asyncio.sleep(0.3)
        # prefetch=1: the busy worker left the second task for others.
        assert started.empty()
        assert (await broker.queue_depth(QUEUE_TASKS))[0] == 1
    assert first.run_id == 21
    # The first task was acked when it started: stopping the worker does not requeue it.
    assert (await broker.queue_depth(QUEUE_TASKS))[0] == 1


async def test_ack_early_handler_errors_do_not_stop_the_consumer(broker: Broker) -> None:
    seen: list[int] = []
    done = asyncio.Event()

    async def handler(message: Task) -> None:
        seen.append(message.run_id)
        if message.run_id == 31:
            raise RuntimeError("crash in the run")
        done.set()

    async with consuming(
        broker, QUEUE_TASKS, handler, accept=(Task,), ack_early=True, poll_interval_s=0.05
    ):
        await broker.publish(EXCHANGE_TASKS, ROUTE_TASK, make_task(31))
        await broker.publish(EXCHANGE_TASKS, ROUTE_TASK, make_task(32))
        await asyncio.wait_for(done.wait(), WAIT_S)
    assert seen == [31, 32]
    assert (await broker.queue_depth(QUEUE_TASKS))[0] == 0
    assert (await broker.queue_depth(QUEUE_DEAD))[0] == 0


async def test_queue_depth_counts_ready_messages_and_consumers(broker: Broker) -> None:
    assert await broker.queue_depth(QUEUE_DUE) == (0, 0)
    for run_id in range(3):
        await broker.publish(
            EXCHANGE_DUE, ROUTE_DUE, Due(run_id=run_id, deadline_at=datetime.now(UTC))
        )
    assert await broker.queue_depth(QUEUE_DUE) == (3, 0)
    release = asyncio.Event()

    async def handler(message: Due) -> None:
        await release.wait()

    async with consuming(broker, QUEUE_DUE, handler, accept=(Due,)):
        # prefetch=1: one message is with the consumer, two are still ready.
        await wait_depth(broker, QUEUE_DUE, 2)
        assert (await broker.queue_depth(QUEUE_DUE))[1] == 1
        release.set()
        await wait_depth(broker, QUEUE_DUE, 0)
    assert await broker.queue_depth(QUEUE_DUE) == (0, 0)


async def test_close_stops_consumers(amqp_url: str) -> None:
    own = await Broker.connect(amqp_url)
    task = asyncio.create_task(own.consume(QUEUE_DUE, _never, accept=(Due,)))
    await asyncio.sleep(0.1)
    await own.close()
    await asyncio.wait_for(task, WAIT_S)
    assert task.done()


async def _never(message: Message) -> None:
    raise AssertionError("no message expected")

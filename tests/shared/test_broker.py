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
import asyncpg
import pytest
from aio_pika.abc import AbstractChannel

import shared.broker
import shared.outage
from shared.broker import RETRIES_HEADER, Broker, PublishError
from shared.errors import MessageError
from shared.feed import TaskFeed
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
from shared.topology import PRIORITY_JOB

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


async def wait_consumers(broker: Broker, queue: str, consumers: int) -> None:
    for _ in range(100):
        if (await broker.queue_depth(queue))[1] == consumers:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{queue} never had {consumers} consumers")


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
    # The tasks queue delivers by priority: these go with a job task's, in the order sent.
    await exchange.publish(aio_pika.Message(b"{not json", priority=PRIORITY_JOB), ROUTE_TASK)
    await exchange.publish(aio_pika.Message(b'{"kind": "task", "run_id": "x"}',
                                            priority=PRIORITY_JOB), ROUTE_TASK)
    # A valid message of the wrong kind for this queue.
    done = make_done()
    await exchange.publish(aio_pika.Message(done.model_dump_json().encode(),
                                            priority=PRIORITY_JOB), ROUTE_TASK)
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


async def test_an_outage_is_waited_out_in_place_never_counted_nor_dead_lettered(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Short back-off for the test; the rule under test is the count, not the delay.
    monkeypatch.setattr(shared.outage.Backoff, "next_delay_s", lambda self: 0.01)
    calls: list[Done] = []
    finished = asyncio.Event()

    async def handler(message: Done) -> None:
        calls.append(message)
        if len(calls) <= 8:  # more failures than max_retries allows for a failure of the work
            raise asyncpg.exceptions.CannotConnectNowError("the database system is starting up")
        finished.set()

    async with consuming(broker, QUEUE_DONE, handler, accept=(Done,), max_retries=2):
        await broker.publish(EXCHANGE_DONE, ROUTE_DONE, make_done(11))
        await asyncio.wait_for(finished.wait(), WAIT_S)
    assert [call.run_id for call in calls] == [11] * 9
    assert await broker.queue_depth(QUEUE_DONE) == (0, 0)
    assert (await broker.queue_depth(QUEUE_DEAD))[0] == 0


async def test_a_connection_error_is_an_outage(broker: Broker) -> None:
    calls: list[Done] = []
    finished = asyncio.Event()

    async def handler(message: Done) -> None:
        calls.append(message)
        if len(calls) == 1:
            raise ConnectionRefusedError("database is down")
        finished.set()

    async with consuming(broker, QUEUE_DONE, handler, accept=(Done,), max_retries=0):
        await broker.publish(EXCHANGE_DONE, ROUTE_DONE, make_done(11))
        await asyncio.wait_for(finished.wait(), WAIT_S)
    assert [call.run_id for call in calls] == [11, 11]
    assert (await broker.queue_depth(QUEUE_DEAD))[0] == 0


async def test_a_broker_started_while_rabbitmq_is_down_connects_when_it_is_up() -> None:
    own = Broker("amqp://guest:guest@127.0.0.1:1/")
    own.start()
    try:
        with pytest.raises(TimeoutError):
            await own.wait_ready(timeout_s=1.0)
        assert own.ready is False
        with pytest.raises(PublishError):
            await asyncio.wait_for(own.publish(EXCHANGE_TASKS, ROUTE_TASK, make_task()),
                                   shared.broker.PUBLISH_TIMEOUT_S + 5)
    finally:
        await own.close()


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


async def test_feed_takes_one_task_per_free_slot_and_unsubscribes_while_full(
    broker: Broker,
) -> None:
    announced: list[int] = []

    async def before_ack(task: Task) -> None:
        announced.append(task.run_id)

    await broker.publish(EXCHANGE_TASKS, ROUTE_TASK, make_task(21))
    await broker.publish(EXCHANGE_TASKS, ROUTE_TASK, make_task(22))
    feed = TaskFeed(broker, QUEUE_TASKS, (Task,), capacity=1, before_ack=before_ack)
    try:
        first = await asyncio.wait_for(feed.next(), WAIT_S)
        assert first.run_id == 21 and announced == [21]
        # The only slot is taken: the second task stays for other workers and this worker is
        # not a consumer of the queue while busy.
        await wait_depth(broker, QUEUE_TASKS, 1)
        await wait_consumers(broker, QUEUE_TASKS, 0)
        feed.release()
        second = await asyncio.wait_for(feed.next(), WAIT_S)
        assert second.run_id == 22 and announced == [21, 22]
        feed.release()
        # Free again: subscribed, so the broker's consumer count shows a ready worker.
        await wait_consumers(broker, QUEUE_TASKS, 1)
    finally:
        await feed.close()
    # Both were acked when taken: closing the feed gives nothing back.
    assert await broker.queue_depth(QUEUE_TASKS) == (0, 0)


async def test_feed_gives_the_task_back_when_it_cannot_be_announced(broker: Broker) -> None:
    attempts: list[int] = []

    async def before_ack(task: Task) -> None:
        attempts.append(task.run_id)
        if len(attempts) == 1:
            raise PublishError("broker unavailable: heartbeat not confirmed")

    await broker.publish(EXCHANGE_TASKS, ROUTE_TASK, make_task(31))
    feed = TaskFeed(broker, QUEUE_TASKS, (Task,), capacity=1, before_ack=before_ack)
    try:
        # Not announced, so not acked: it went back to the queue and came round again.
        task = await asyncio.wait_for(feed.next(), WAIT_S)
    finally:
        await feed.close()
    assert task.run_id == 31
    assert attempts == [31, 31]
    assert (await broker.queue_depth(QUEUE_TASKS))[0] == 0
    assert (await broker.queue_depth(QUEUE_DEAD))[0] == 0


async def test_feed_dead_letters_what_is_not_a_task(
    broker: Broker, raw_channel: AbstractChannel
) -> None:
    exchange = await raw_channel.get_exchange(EXCHANGE_TASKS)
    await exchange.publish(aio_pika.Message(b"{not json", priority=PRIORITY_JOB), ROUTE_TASK)
    await broker.publish(EXCHANGE_TASKS, ROUTE_TASK, make_task(41))

    async def before_ack(task: Task) -> None:
        return None

    feed = TaskFeed(broker, QUEUE_TASKS, (Task,), capacity=1, before_ack=before_ack)
    try:
        task = await asyncio.wait_for(feed.next(), WAIT_S)
    finally:
        await feed.close()
    assert task.run_id == 41
    assert (await raw_get(raw_channel, QUEUE_DEAD)).body == b"{not json"


async def test_feed_closed_gives_back_what_it_did_not_hand_out(broker: Broker) -> None:
    async def before_ack(task: Task) -> None:
        return None

    feed = TaskFeed(broker, QUEUE_TASKS, (Task,), capacity=2, before_ack=before_ack)
    taking = asyncio.create_task(feed.next())
    await broker.publish(EXCHANGE_TASKS, ROUTE_TASK, make_task(61))
    assert (await asyncio.wait_for(taking, WAIT_S)).run_id == 61
    await broker.publish(EXCHANGE_TASKS, ROUTE_TASK, make_task(62))
    # Delivered to the feed (a slot was free), not taken by anyone: closing requeues it.
    await wait_depth(broker, QUEUE_TASKS, 0)
    await asyncio.sleep(0.2)
    await feed.close()
    await wait_depth(broker, QUEUE_TASKS, 1)
    again = await broker.get(QUEUE_TASKS)
    assert isinstance(again, Task) and again.run_id == 62


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

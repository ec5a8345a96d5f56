"""The dead queue and `oa-machine dead-letters`, against the real RabbitMQ."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

import shared.broker
from shared.broker import RETRIES_HEADER, Broker
from shared.dead_letters import replay, summarise
from shared.messages import (
    EXCHANGE_DONE,
    EXCHANGE_TASKS,
    QUEUE_DONE,
    QUEUE_TASKS,
    ROUTE_DONE,
    ROUTE_TASK,
    Done,
)


async def _dead_letter_a_done_after_its_retries(broker: Broker) -> None:
    async def handler(message: Done) -> None:
        raise RuntimeError("a bug in the handler")

    consumer = asyncio.create_task(
        broker.consume(QUEUE_DONE, handler, accept=(Done,), max_retries=1))
    try:
        await broker.publish(EXCHANGE_DONE, ROUTE_DONE, Done(run_id=5, worker="w",
                                                              status="success"))
        for _ in range(200):
            if (await broker.queue_depth("dead"))[0] == 1:
                break
            await asyncio.sleep(0.05)
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)


async def test_replay_puts_a_dead_message_back_where_it_died_with_its_count_cleared(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared.broker, "RETRY_DELAY_S", 0.01)
    await _dead_letter_a_done_after_its_retries(broker)
    assert (await broker.queue_depth("dead"))[0] == 1
    counts = await summarise(broker)
    assert dict(counts) == {("done", "done"): 1}
    # Counting removed nothing.
    assert (await broker.queue_depth("dead"))[0] == 1

    assert await replay(broker) == (1, 0)
    assert (await broker.queue_depth("dead"))[0] == 0
    channel: AbstractChannel = await broker.channel()
    try:
        queue = await channel.get_queue(QUEUE_DONE)
        message = await queue.get(no_ack=True, fail=False, timeout=5)
        assert message is not None
        assert Done.model_validate_json(message.body).run_id == 5
        assert RETRIES_HEADER not in (message.headers or {})
        assert "x-death" not in (message.headers or {})
    finally:
        await channel.close()


async def test_the_command_counts_and_replays(broker: Broker, amqp_url: str) -> None:
    channel = await broker.channel()
    try:
        exchange = await channel.get_exchange(EXCHANGE_TASKS)
        await exchange.publish(aio_pika.Message(b"{not json", type="task"), ROUTE_TASK)
    finally:
        await channel.close()
    # A consumer of `tasks` dead-letters what is not a task.
    assert isinstance(await _get_invalid(broker), Exception)
    env = {**os.environ, "AMQP_URL": amqp_url, "LOG_FORMAT": "json"}

    def command(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "services", "dead-letters", *args],
                              env=env, capture_output=True, text=True, timeout=60,
                              check=True).stdout

    assert "1  task from tasks.priority" in await asyncio.to_thread(command)
    assert "replayed 1 message(s)" in await asyncio.to_thread(command, "--replay")
    assert (await broker.queue_depth(QUEUE_TASKS))[0] == 1


async def _get_invalid(broker: Broker) -> Exception | None:
    from shared.errors import MessageError

    try:
        await broker.get(QUEUE_TASKS)
    except MessageError as exc:
        return exc
    return None

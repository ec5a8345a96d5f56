"""The `dead` queue: what it holds and putting it back (``oa-machine dead-letters``).

Only two things end there (``shared/broker.py``): a message that is not a valid message of its
queue (it will never be), and a message whose handler failed ``max_retries`` times for a reason
of its own (a bug). Outages never put anything there. After a fix, an operator replays the
second kind: each message goes back to the exchange and routing key it was dead-lettered from
(RabbitMQ's ``x-death`` header), with its retry count cleared. A message without ``x-death``
(not dead-lettered by RabbitMQ) is left where it is.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from shared.broker import RETRIES_HEADER, Broker
from shared.messages import QUEUE_DEAD


@dataclass(frozen=True)
class DeadLetter:
    """Where one dead message came from."""

    kind: str
    queue: str
    exchange: str
    routing_key: str
    reason: str


def origin(message: AbstractIncomingMessage) -> DeadLetter | None:
    """Where ``message`` was dead-lettered from, read from its ``x-death`` header."""
    deaths = (message.headers or {}).get("x-death")
    if not isinstance(deaths, list) or not deaths or not isinstance(deaths[0], dict):
        return None
    death: dict[str, Any] = deaths[0]
    keys = death.get("routing-keys") or []
    return DeadLetter(
        kind=str(message.type or "?"), queue=str(death.get("queue", "?")),
        exchange=str(death.get("exchange", "")),
        routing_key=str(keys[0]) if keys else str(death.get("queue", "")),
        reason=str(death.get("reason", "?")),
    )


async def summarise(broker: Broker, *, limit: int = 10_000) -> Counter[tuple[str, str]]:
    """How many dead messages there are per (queue they died in, kind); nothing is removed."""
    counts: Counter[tuple[str, str]] = Counter()
    taken: list[AbstractIncomingMessage] = []
    channel = await broker.channel()
    try:
        queue = await channel.get_queue(QUEUE_DEAD, ensure=True)
        # Held unacked until the end, so each message is seen once; then all go back.
        while len(taken) < limit:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            taken.append(message)
            found = origin(message)
            counts[(found.queue if found else "?", str(message.type or "?"))] += 1
    finally:
        with contextlib.suppress(Exception):
            await channel.close()  # every unacked message returns to the queue
    return counts


async def replay(broker: Broker, *, limit: int = 10_000) -> tuple[int, int]:
    """Put dead messages back where they came from; returns ``(replayed, left)``."""
    replayed = left = 0
    channel = await broker.channel()
    kept: list[AbstractIncomingMessage] = []
    try:
        queue = await channel.get_queue(QUEUE_DEAD, ensure=True)
        while replayed + left < limit:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            found = origin(message)
            if found is None:
                kept.append(message)
                left += 1
                continue
            headers = {
                key: value for key, value in (message.headers or {}).items()
                if key not in ("x-death", RETRIES_HEADER)
                and not key.startswith("x-first-death") and not key.startswith("x-last-death")
            }
            await broker.publish_raw(found.exchange, found.routing_key, aio_pika.Message(
                body=message.body, headers=headers, content_type=message.content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=message.message_id,
                type=message.type, timestamp=message.timestamp,
            ))
            await message.ack()
            replayed += 1
    finally:
        with contextlib.suppress(Exception):
            await channel.close()  # what was kept goes back to the dead queue
    return replayed, left

"""The worker's outbox: results kept on disk until the real broker takes them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import shared.broker
from services.worker.outbox import Outbox
from shared.broker import Broker
from shared.messages import EXCHANGE_DONE, QUEUE_DONE, ROUTE_DONE, ROUTE_RETURNED, Done, Returned


def done(run_id: int) -> Done:
    return Done(run_id=run_id, worker="w-1", status="success",
                outputs={"out.csv": f"runs/{run_id}/out.csv"})


async def test_send_publishes_and_leaves_nothing_behind(broker: Broker, tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox", broker)
    assert await outbox.send(EXCHANGE_DONE, ROUTE_DONE, done(1)) is True
    assert outbox.pending() == []
    got = await broker.get(QUEUE_DONE)
    assert isinstance(got, Done) and got.run_id == 1


async def test_what_the_broker_does_not_take_waits_on_disk_and_survives_a_restart(
    amqp_url: str, broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared.broker, "PUBLISH_TIMEOUT_S", 0.5)
    folder = tmp_path / "outbox"
    # A broker that never connects: RabbitMQ is down as far as this worker can tell.
    away = Broker("amqp://guest:guest@127.0.0.1:1/")
    away.start()
    try:
        first_life = Outbox(folder, away)
        assert await first_life.send(EXCHANGE_DONE, ROUTE_DONE, done(2)) is False
        first_life.put(EXCHANGE_DONE, ROUTE_RETURNED, Returned(
            run_id=3, attempt=1, worker="w-1", reason="stopped"))
        assert await first_life.flush() == 0
        assert [item.message.run_id for item in first_life.pending()] == [2, 3]  # type: ignore[attr-defined]
    finally:
        await away.close()

    # The worker restarts (a new process, the same folder) with the broker back.
    second_life = Outbox(folder, broker)
    assert await second_life.flush() == 2
    assert second_life.pending() == []
    got = [await broker.get(QUEUE_DONE) for _ in range(2)]
    assert [(type(m).__name__, m.run_id) for m in got if m is not None] == [  # type: ignore[union-attr]
        ("Done", 2), ("Returned", 3)]


async def test_an_unreadable_file_is_moved_aside_not_published(
    broker: Broker, tmp_path: Path
) -> None:
    outbox = Outbox(tmp_path / "outbox", broker)
    outbox.put(EXCHANGE_DONE, ROUTE_DONE, done(4))
    (outbox.folder / "00000000000000000000-broken.json").write_text("{not json")
    assert await outbox.flush() == 1
    assert (outbox.folder / "unreadable" / "00000000000000000000-broken.json").exists()
    assert outbox.pending() == []
    got = await broker.get(QUEUE_DONE)
    assert isinstance(got, Done) and got.run_id == 4


async def test_the_background_loop_publishes_once_the_broker_takes_it(
    broker: Broker, tmp_path: Path
) -> None:
    outbox = Outbox(tmp_path / "outbox", broker)
    loop = asyncio.create_task(outbox.run())
    try:
        outbox.put(EXCHANGE_DONE, ROUTE_DONE, done(5))
        got = await broker.get(QUEUE_DONE, timeout_s=10)
        assert isinstance(got, Done) and got.run_id == 5
        for _ in range(50):
            if not outbox.pending():
                break
            await asyncio.sleep(0.05)
        assert outbox.pending() == []
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)

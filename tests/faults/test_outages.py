"""RabbitMQ and PostgreSQL going away and coming back while the system works.

Every service must stay up through it, every run must settle exactly once with the result it
really had, and nothing may end in the `dead` queue.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.faults.harness import ROWS, System, all_alive, finished_events, wait_until

pytestmark = pytest.mark.timeout(420)


async def test_a_broker_restart_with_runs_queued_and_in_flight_loses_and_doubles_nothing(
    system: System,
) -> None:
    system.data.add("/slow.csv", ROWS, delay_s=1.5)
    dequeuer = system.start("dequeuer", ["dequeuer"])
    webhook = await system.start_webhook()
    workers = {name: system.start_worker(name, WORKER_CONCURRENCY="2")
                for name in ("worker-a", "worker-b")}
    for worker in workers.values():
        await worker.wait_for_event_async("broker.consuming", timeout_s=60)
    await system.push(50, data_path="/slow.csv")

    async def some_settled() -> bool:
        rows = await system.query("SELECT count(*) AS n FROM runs WHERE status IS NOT NULL")
        return int(rows[0]["n"]) >= 8

    await wait_until(some_settled, timeout_s=120, what="the first runs to settle")
    await asyncio.to_thread(system.rabbit.stop)
    await asyncio.sleep(3)
    await asyncio.to_thread(system.rabbit.start)

    await wait_until(lambda: system.all_settled(50), timeout_s=300,
                     what="all 50 runs to settle after the broker came back")
    processes = {"dequeuer": dequeuer, "webhook": webhook, **workers}
    assert all_alive(processes) == [], system.processes.outputs()
    runs = await system.runs()
    assert [run["status"] for run in runs] == ["success"] * 50, [dict(run) for run in runs]
    assert finished_events(dequeuer) == {run["id"]: 1 for run in runs}
    assert await system.queue_ready("dead") == 0
    # Every service noticed the outage and reconnected by itself.
    for name, process in processes.items():
        assert process.events("broker.reconnected"), f"{name} never reconnected"


async def test_postgresql_down_for_a_minute_while_runs_finish_loses_no_result(
    system: System,
) -> None:
    system.data.add("/slow.csv", ROWS, delay_s=8)
    dequeuer = system.start("dequeuer", ["dequeuer"])
    scheduler = system.start("scheduler", ["scheduler"])
    webhook = await system.start_webhook()
    await scheduler.wait_for_event_async("scheduler.leading", timeout_s=60)
    worker = system.start_worker("worker-a", WORKER_CONCURRENCY="4")
    await worker.wait_for_event_async("broker.consuming", timeout_s=60)
    await system.push(4, data_path="/slow.csv")

    async def all_started() -> bool:
        return len(worker.events("run.started")) == 4

    await wait_until(all_started, timeout_s=60, what="the four runs to start")
    await asyncio.to_thread(system.postgres.stop)
    down_at = time.monotonic()
    # The runs finish while the database is down; their results wait in `done`.
    async def all_finished() -> bool:
        return len(worker.events("run.success")) == 4

    await wait_until(all_finished, timeout_s=60, what="the runs to finish during the outage")
    await asyncio.sleep(max(0.0, 60 - (time.monotonic() - down_at)))
    services = {"dequeuer": dequeuer, "webhook": webhook, "worker": worker,
                "scheduler": scheduler}
    assert all_alive(services) == [], system.processes.outputs()
    await asyncio.to_thread(system.postgres.start)

    await wait_until(lambda: system.all_settled(4), timeout_s=120,
                     what="the results to be recorded once PostgreSQL is back")
    runs = await system.runs()
    assert [(run["status"], run["attempt"]) for run in runs] == [("success", 1)] * 4
    assert finished_events(dequeuer) == {run["id"]: 1 for run in runs}
    assert await system.queue_ready("dead") == 0
    assert dequeuer.events("broker.handler_waiting"), "the dequeuer never waited for PostgreSQL"
    # The scheduler lost its connection (and the leader lock with it) and leads again.
    await scheduler.wait_for_event_async("scheduler.database_unavailable", timeout_s=5)

    async def leads_again() -> bool:
        return len(scheduler.events("scheduler.leading")) >= 2

    await wait_until(leads_again, timeout_s=60, what="the scheduler to lead again")
    assert all_alive(services) == [], system.processes.outputs()


async def test_a_push_while_the_broker_is_down_is_queued_once_it_is_back(system: System) -> None:
    dequeuer = system.start("dequeuer", ["dequeuer"])
    webhook = await system.start_webhook()
    worker = system.start_worker("worker-a")
    await worker.wait_for_event_async("broker.consuming", timeout_s=60)
    await asyncio.to_thread(system.rabbit.stop)

    started = time.monotonic()
    _sha, answer = await system.push(2)
    answered_s = time.monotonic() - started
    assert answer["runs"] == 2 and answer["job"] is not None
    # GitHub gives up on a delivery after 10 s: the webhook must not wait for the broker.
    assert answered_s < 8, answered_s
    runs = await system.runs()
    assert [run["queued_at"] for run in runs] == [None, None]

    await asyncio.to_thread(system.rabbit.start)
    await wait_until(lambda: system.all_settled(2), timeout_s=120,
                     what="the runs to be queued and settle once the broker is back")
    runs = await system.runs()
    assert [run["status"] for run in runs] == ["success", "success"]
    assert finished_events(dequeuer) == {run["id"]: 1 for run in runs}
    assert all_alive({"dequeuer": dequeuer, "webhook": webhook, "worker": worker}) == []

"""Messages that come twice, late, or to a GitHub that fails: one settlement, statuses in order."""

from __future__ import annotations

import asyncio

import aio_pika
import asyncpg
import pytest

from shared.messages import EXCHANGE_DONE, ROUTE_DONE, Done
from tests.faults.harness import System, finished_events, wait_until

pytestmark = pytest.mark.timeout(300)


async def _publish(amqp_url: str, *messages: Done) -> None:
    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(EXCHANGE_DONE)
        for message in messages:
            await exchange.publish(
                aio_pika.Message(message.model_dump_json().encode(),
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                ROUTE_DONE,
            )
    finally:
        await connection.close()


async def test_the_same_done_three_times_and_a_superseded_one_settle_the_run_once(
    system: System,
) -> None:
    dequeuer = system.start("dequeuer", ["dequeuer"])
    await dequeuer.wait_for_event_async("broker.consuming", timeout_s=60, queue="done")
    conn = await asyncpg.connect(system.database_url)
    try:
        job_id = await conn.fetchval(
            "INSERT INTO jobs (delivery_id, event, repo, sha, ref) VALUES "
            "('d-1', 'push', 'o/r', $1, 'refs/heads/main') RETURNING id", "a" * 40)
        # The run's first worker was presumed lost: attempt 2 is the current one.
        run_id = await conn.fetchval(
            "INSERT INTO runs (job_id, source_path, layer, entry_name, attempt, lost_attempts,"
            " queued_at, lease_until) VALUES ($1, 'sources/x.json', 'addresses', 'city', 2, 1,"
            " now(), now() + interval '1 hour') RETURNING id", job_id)
    finally:
        await conn.close()
    late = Done(run_id=run_id, attempt=1, worker="lost-worker", status="failure",
                source_problem="conform_failed", error="from the attempt that was superseded",
                outputs={"out.csv": f"runs/{run_id}/attempt-1/out.csv"})
    winner = Done(run_id=run_id, attempt=2, worker="worker-b", status="success",
                  outputs={"out.csv": f"runs/{run_id}/out.csv"}, state={"feature count": 2})
    await _publish(system.amqp_url, late, winner, winner, winner, late)

    await wait_until(lambda: system.all_settled(1), timeout_s=60, what="the run to settle")
    await asyncio.sleep(2)  # let the duplicates and the late one be handled too
    (run,) = await system.runs()
    assert (run["status"], run["worker"], run["attempt"]) == ("success", "worker-b", 2)
    assert run["outputs"] == {"out.csv": f"runs/{run_id}/out.csv"}
    assert finished_events(dequeuer) == {run_id: 1}
    assert len(dequeuer.events("run.superseded_done", run_id=run_id)) >= 1
    assert len(dequeuer.events("run.duplicate_done", run_id=run_id)) >= 2
    statuses = await system.query("SELECT state FROM statuses WHERE job_id = $1", job_id)
    assert [row["state"] for row in statuses] == ["success"]
    assert await system.queue_ready("dead") == 0


async def test_github_failing_then_refusing_a_status_gets_order_then_gives_up(
    system: System,
) -> None:
    dequeuer = system.start("dequeuer", ["dequeuer"])
    await system.start_webhook()
    worker = system.start_worker("worker-a")
    await worker.wait_for_event_async("broker.consuming", timeout_s=60)
    # GitHub fails twice on the job's `pending`, then refuses its final status for good.
    sha = "b" * 40
    system.github.answer_statuses(500, 500, sha=sha, state="pending")
    system.github.answer_statuses(422, sha=sha, state="success")
    await system.push(sha=sha)

    async def given_up() -> bool:
        rows = await system.query("SELECT count(*) AS n FROM statuses WHERE given_up_at IS NOT "
                                  "NULL")
        return int(rows[0]["n"]) == 1

    await wait_until(given_up, timeout_s=150, what="the refused status to be given up")
    assert system.github.requests_for(sha) == [500, 500, 201, 422]
    rows = await system.query("SELECT state, posted_at, given_up_at, last_error, attempts "
                              "FROM statuses ORDER BY id")
    assert [(row["state"], row["posted_at"] is not None, row["given_up_at"] is not None)
            for row in rows] == [("pending", True, False), ("success", False, True)]
    assert "422" in rows[1]["last_error"] and rows[1]["attempts"] == 1
    # Not tried again: two more chores later GitHub has still seen one request for it.
    await asyncio.sleep(12)
    assert system.github.requests_for(sha, "success") == [422]
    assert dequeuer.events("status.given_up")

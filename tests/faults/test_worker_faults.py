"""Workers that die, are stopped, or hang: no run lost, none settled twice.

Real processes (``python -m services ...``) against a PostgreSQL and a RabbitMQ of the module's
own; GitHub and the data provider are real HTTP servers on 127.0.0.1 in the test's event loop
(so blocking waits go through ``asyncio.to_thread``). Timings are shortened
(``tests/faults/harness.py``: heartbeat 1 s, lease 8 s) in the same ratio as the defaults.
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from tests.faults.harness import ROWS, System, finished_events, wait_until

pytestmark = pytest.mark.timeout(300)


async def test_a_killed_busy_worker_s_run_completes_exactly_once_on_another(
    system: System,
) -> None:
    system.data.add("/slow.csv", ROWS, delay_s=5)
    dequeuer = system.start("dequeuer", ["dequeuer"])
    await system.start_webhook()
    first = system.start_worker("worker-a")
    await first.wait_for_event_async("broker.consuming", timeout_s=60)
    await system.push(data_path="/slow.csv")
    started = await first.wait_for_event_async("run.started", timeout_s=60)
    run_id = int(started["run_id"])
    # The second worker arrives once the first is busy, so only a recovery can give it the run.
    second = system.start_worker("worker-b")
    await second.wait_for_event_async("broker.consuming", timeout_s=60)
    first.kill()

    took_s = await wait_until(lambda: system.all_settled(1), timeout_s=180,
                              what="the run to settle on the other worker")
    (run,) = await system.runs()
    assert (run["id"], run["status"], run["worker"]) == (run_id, "success", "worker-b"), (
        dict(run), dequeuer.output())
    assert (run["attempt"], run["lost_attempts"]) == (2, 1)
    assert "sent no heartbeat" in (await dequeuer.wait_for_event_async(
        "run.requeued", timeout_s=1, run_id=run_id))["detail"]
    assert finished_events(dequeuer) == {run_id: 1}
    assert [e["attempt"] for e in second.events("run.started")] == [2]
    assert took_s < 180
    assert dequeuer.alive and second.alive


async def test_a_stopped_worker_finishes_its_run_within_the_grace_period(system: System) -> None:
    system.data.add("/slow.csv", ROWS, delay_s=4)
    dequeuer = system.start("dequeuer", ["dequeuer"])
    await system.start_webhook()
    worker = system.start_worker("worker-a", WORKER_GRACE_S="60")
    await worker.wait_for_event_async("broker.consuming", timeout_s=60)
    await system.push(data_path="/slow.csv")
    started = await worker.wait_for_event_async("run.started", timeout_s=60)
    worker.signal(signal.SIGTERM)

    assert await asyncio.to_thread(worker.wait, 60) == 0, worker.output()
    assert worker.events("worker.stopping")
    assert worker.events("run.success", run_id=started["run_id"])
    assert not worker.events("run.handed_back")
    await wait_until(lambda: system.all_settled(1), timeout_s=60, what="the run to settle")
    (run,) = await system.runs()
    assert (run["status"], run["attempt"], run["lost_attempts"]) == ("success", 1, 0)
    assert finished_events(dequeuer) == {run["id"]: 1}


async def test_a_stopped_worker_hands_back_a_run_longer_than_its_grace(system: System) -> None:
    system.data.add("/slow.csv", ROWS, delay_s=6)
    dequeuer = system.start("dequeuer", ["dequeuer"])
    await system.start_webhook()
    first = system.start_worker("worker-a", WORKER_GRACE_S="1")
    await first.wait_for_event_async("broker.consuming", timeout_s=60)
    await system.push(data_path="/slow.csv")
    started = await first.wait_for_event_async("run.started", timeout_s=60)
    second = system.start_worker("worker-b")
    await second.wait_for_event_async("broker.consuming", timeout_s=60)
    first.signal(signal.SIGTERM)

    assert await asyncio.to_thread(first.wait, 60) == 0, first.output()
    assert first.events("run.handed_back", run_id=started["run_id"])
    await wait_until(lambda: system.all_settled(1), timeout_s=120,
                     what="the handed-back run to settle on the other worker")
    (run,) = await system.runs()
    assert (run["status"], run["worker"]) == ("success", "worker-b"), dict(run)
    assert (run["attempt"], run["lost_attempts"]) == (2, 1)
    requeued = dequeuer.events("run.requeued", run_id=run["id"])
    assert [event["reason"] for event in requeued] == ["returned"]
    assert finished_events(dequeuer) == {run["id"]: 1}


async def test_a_run_that_hangs_past_its_limit_times_out_and_frees_the_worker(
    system: System,
) -> None:
    system.data.add("/hang.csv", ROWS, delay_s=3600)
    system.extra_env["RUN_TIMEOUT_S"] = "4"
    dequeuer = system.start("dequeuer", ["dequeuer"])
    await system.start_webhook()
    worker = system.start_worker("worker-a")
    await worker.wait_for_event_async("broker.consuming", timeout_s=60)
    await system.push(data_path="/hang.csv")
    await wait_until(lambda: system.all_settled(1), timeout_s=90, what="the run to time out")
    (hung,) = await system.runs()
    assert (hung["status"], hung["source_problem"]) == ("failure", "timeout"), dict(hung)
    assert "time limit of 4 s" in hung["error"]

    # The same worker takes the next run.
    await system.push()
    await wait_until(lambda: system.all_settled(2), timeout_s=90, what="the next run to settle")
    _, following = await system.runs()
    assert (following["status"], following["worker"]) == ("success", "worker-a")
    assert finished_events(dequeuer) == {hung["id"]: 1, following["id"]: 1}
    assert worker.alive


async def test_a_transient_download_failure_is_retried_as_a_whole_run_later(
    system: System,
) -> None:
    # Three 503s use up the run's own tries (tries=3); the whole run is tried again later and
    # then the server answers.
    system.data.add("/flaky.csv", ROWS, failures=[503, 503, 503])
    system.extra_env.update({"RUN_RETRY_DELAY_S": "1", "RUN_RETRY_MAX": "2"})
    dequeuer = system.start("dequeuer", ["dequeuer"])
    await system.start_webhook()
    worker = system.start_worker("worker-a")
    await worker.wait_for_event_async("broker.consuming", timeout_s=60)
    await system.push(data_path="/flaky.csv")
    await wait_until(lambda: system.all_settled(1), timeout_s=120, what="the retried run")
    (run,) = await system.runs()
    assert (run["status"], run["attempt"], run["retries"]) == ("success", 2, 1), dict(run)
    (scheduled,) = dequeuer.events("run.retry_scheduled", run_id=run["id"])
    assert "HTTP 503" in scheduled["error"]
    assert [e["attempt"] for e in worker.events("run.started")] == [1, 2]
    assert finished_events(dequeuer) == {run["id"]: 1}

"""The metrics and health server every service has, over real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest

from services.dequeuer.service import Dequeuer
from shared.broker import Broker
from shared.config import Settings
from shared.github import GitHub
from shared.probes import ProbeServer, database_check


async def _broken() -> None:
    raise ConnectionRefusedError("RabbitMQ is not there")


async def test_live_ready_and_metrics(db_pool: asyncpg.Pool) -> None:
    server = ProbeServer("127.0.0.1", 0, {"database": database_check(db_pool), "broker": _broken})
    async with server, aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{server.port}"
        async with session.get(f"{base}/health/live") as response:
            assert response.status == 200
        async with session.get(f"{base}/health/ready") as response:
            # Not ready while one dependency is missing, and the answer says which.
            assert response.status == 503
            answer = await response.json()
        async with session.get(f"{base}/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = await response.text()
    assert answer["checks"]["database"] == "ok"
    assert answer["checks"]["broker"].startswith("ConnectionRefusedError")
    for name in ("oa_runs_in_flight", "oa_queue_ready_messages", "oa_workers",
                 "oa_run_duration_seconds", "oa_status_outbox_backlog", "oa_reconnects_total"):
        assert name in text



async def _hangs() -> None:
    await asyncio.Event().wait()  # a server that accepts and never answers


async def test_liveness_never_asks_the_dependencies() -> None:
    """PostgreSQL and RabbitMQ both down (one refusing, one hanging): /health/live still answers
    200 at once, so Kubernetes restarts no pod for an outage; /health/ready says 503."""
    server = ProbeServer("127.0.0.1", 0, {"database": _hangs, "broker": _broken})
    async with server, aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{server.port}"
        started = asyncio.get_running_loop().time()
        async with session.get(f"{base}/health/live") as response:
            assert response.status == 200
            assert (await response.json())["status"] == "alive"
        assert asyncio.get_running_loop().time() - started < 1.0
        async with session.get(f"{base}/health/ready") as response:
            assert response.status == 503
            answer = await response.json()
    assert answer["checks"]["database"].startswith("TimeoutError")
    assert answer["checks"]["broker"].startswith("ConnectionRefusedError")


@pytest.fixture
async def dequeuer(settings: Settings, db_pool: asyncpg.Pool) -> AsyncIterator[Dequeuer]:
    broker = await Broker.connect(settings.amqp_url)
    github = GitHub.open("http://127.0.0.1:9", None)
    service = Dequeuer(settings, db_pool, broker, github)
    task = asyncio.create_task(service.run())
    try:
        for _ in range(100):
            if service.probes is not None and service.probes.port:
                break
            await asyncio.sleep(0.05)
        yield service
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await broker.close()
        await github.close()


async def test_the_dequeuer_tells_keda_the_runs_queued_and_running(
    dequeuer: Dequeuer, db_pool: asyncpg.Pool
) -> None:
    # One running (lease), two queued, one waiting for a retry: KEDA sizes for three.
    states = [
        "queued_at = now(), lease_until = now() + interval '1 minute'",
        "queued_at = now()",
        "queued_at = now()",
        "retry_at = now() + interval '1 hour'",
    ]
    for state in states:
        run_id = await db_pool.fetchval(
            "INSERT INTO runs (source_path, layer, entry_name, source) VALUES "
            "('sources/a.json', 'addresses', 'x', '{}') RETURNING id")
        await db_pool.execute(f"UPDATE runs SET {state} WHERE id = $1", run_id)
    assert dequeuer.probes is not None
    async with aiohttp.ClientSession() as session, session.get(
        f"http://127.0.0.1:{dequeuer.probes.port}/scaling"
    ) as response:
        assert response.status == 200
        answer = await response.json()
    assert answer == {"runs_in_flight": 3, "queued": 2, "running": 1, "unqueued": 0,
                      "retrying": 1}

"""Services recover by themselves when the broker or the database drops their connections.

RabbitMQ closes every connection of the test's virtual host (as a broker restart would);
PostgreSQL terminates every backend of the test database (as a database restart would).
The dequeuer keeps running throughout and must still settle the run.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from urllib.parse import unquote, urlparse

import asyncpg
import pytest

from services.demo.github import GitHubStandIn
from services.dequeuer.service import Dequeuer
from shared.broker import Broker, PublishError
from shared.config import Settings
from shared.db import create_pool
from shared.github import GitHub
from shared.messages import EXCHANGE_DONE, ROUTE_DONE, Done
from tests.e2e_support import wait_for


@pytest.fixture
async def dequeuer(settings: Settings) -> AsyncIterator[Dequeuer]:
    stand_in = GitHubStandIn()
    await stand_in.start()
    pool = await create_pool(settings.database_url)
    broker = await Broker.connect(settings.amqp_url, prefetch=4)
    github = GitHub.open(stand_in.url, None)
    service = Dequeuer(settings, pool, broker, github)
    task = asyncio.create_task(service.run())
    try:
        yield service
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await broker.close()
        await github.close()
        await pool.close()
        await stand_in.stop()


async def _open_run(pool: asyncpg.Pool) -> int:
    job_id = await pool.fetchval(
        "INSERT INTO jobs (delivery_id, event, repo, sha, ref) VALUES"
        " ('r-1', 'push', 'o/r', $1, 'refs/heads/main') RETURNING id", "b" * 40)
    run_id: int = await pool.fetchval(
        "INSERT INTO runs (job_id, source_path, layer, entry_name, commit_sha, queued_at) VALUES"
        " ($1, 'sources/a.json', 'addresses', 'x', $2, now()) RETURNING id", job_id, "b" * 40)
    return run_id


async def _publish_until_accepted(broker: Broker, done: Done, timeout_s: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            await broker.publish(EXCHANGE_DONE, ROUTE_DONE, done)
            return
        except PublishError:
            # The robust connection is still reconnecting.
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _settled(pool: asyncpg.Pool, run_id: int) -> bool:
    return await pool.fetchval("SELECT status FROM runs WHERE id = $1", run_id) == "success"


async def test_dequeuer_recovers_after_the_broker_drops_connections(
    settings: Settings, db_pool: asyncpg.Pool, broker: Broker, dequeuer: Dequeuer
) -> None:
    run_id = await _open_run(db_pool)
    await asyncio.sleep(0.5)  # let the dequeuer subscribe
    vhost = unquote(urlparse(settings.amqp_url).path.lstrip("/"))
    # In a thread: the dequeuer under test shares this event loop and must keep running.
    await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "-q", "close_all_connections", "-p", vhost, "test: broker restart"],
        check=True, capture_output=True, timeout=60,
    )
    await asyncio.sleep(1)
    done = Done(run_id=run_id, worker="w", status="success")
    await _publish_until_accepted(broker, done)
    await wait_for(lambda: _settled(db_pool, run_id), timeout_s=45,
                   what="the dequeuer to settle the run after reconnecting")


async def test_dequeuer_recovers_after_the_database_drops_connections(
    settings: Settings, db_pool: asyncpg.Pool, broker: Broker, dequeuer: Dequeuer
) -> None:
    run_id = await _open_run(db_pool)
    admin = await asyncpg.connect(settings.database_url)
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()")
    finally:
        await admin.close()
    assert killed >= 1
    await broker.publish(EXCHANGE_DONE, ROUTE_DONE, Done(run_id=run_id, worker="w",
                                                          status="success"))

    async def settled() -> bool:
        try:
            return await _settled(db_pool, run_id)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            return False  # the test's own pool was cut too

    await wait_for(settled, timeout_s=45, what="the dequeuer to settle the run on new connections")

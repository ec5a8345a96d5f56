"""A webhook killed between its answer and the job loses nothing: another takes over.

Real webhook processes against the real PostgreSQL and RabbitMQ; GitHub is a stand-in on
127.0.0.1, slow on purpose so that the first process is killed while it works on the delivery.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from services.demo.github import GitHubStandIn
from shared.config import Settings
from tests.e2e_support import new_sha, signed_headers
from tests.support.processes import ServiceProcesses
from tests.webhook.test_pull_requests import BASE_REPO, NUMBER, pr_payload, serve_pull, source

SECRET = "restart-secret"


@pytest.mark.timeout(180)
async def test_a_webhook_killed_after_answering_still_makes_the_job(
    settings: Settings, db_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    github = GitHubStandIn()
    await github.start()
    head, base = new_sha(), new_sha()
    serve_pull(github, head, base, {"sources/us/ks/a.json": (None, source("http://x/a.csv",
                                                                           "one"))})
    github.delay_s = 1.5  # every GitHub answer is slow: the first webhook dies mid-way
    env = {
        "DATABASE_URL": settings.database_url, "AMQP_URL": settings.amqp_url,
        "STORAGE_URL": settings.storage_url, "GITHUB_API_URL": github.url,
        "WEBHOOK_SECRETS": SECRET, "PUBLIC_BASE_URL": "http://oa.example.org",
    }
    try:
        with ServiceProcesses(tmp_path / "logs") as processes:
            first = processes.start("webhook-1", ["webhook"], env)
            await first.wait_for_event_async("broker.connected", timeout_s=60)
            body = pr_payload("opened", head, base)
            url = f"http://127.0.0.1:{first.env['HTTP_PORT']}/hook"
            async with aiohttp.ClientSession() as session:
                for _ in range(100):  # the port opens a moment after the broker connects
                    try:
                        async with session.post(url, data=body, headers=signed_headers(
                                body, SECRET, event="pull_request", delivery="d-restart")) as r:
                            assert r.status == 202, await r.text()
                            break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.1)
            # Killed while it reads the pull request's files from GitHub.
            for _ in range(100):
                if github.requests:
                    break
                await asyncio.sleep(0.05)
            assert github.requests, "the first webhook never started on the delivery"
            first.kill()
            assert await db_pool.fetchval("SELECT count(*) FROM jobs") == 0

            github.delay_s = 0
            second = processes.start("webhook-2", ["webhook"], env)
            for _ in range(1200):
                job_id = await db_pool.fetchval(
                    "SELECT job_id FROM deliveries WHERE delivery_id = 'd-restart'"
                    " AND outcome = 'job'")
                if job_id is not None:
                    break
                await asyncio.sleep(0.1)
            assert job_id is not None, second.output()
            job = await db_pool.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
            assert (job["repo"], job["sha"], job["pr_number"]) == (BASE_REPO, head, NUMBER)
            assert await db_pool.fetchval("SELECT count(*) FROM jobs") == 1
            delivery = await db_pool.fetchrow(
                "SELECT attempts, payload FROM deliveries WHERE delivery_id = 'd-restart'")
            assert delivery["attempts"] == 2  # the killed try and the one that made the job
            assert delivery["payload"]["number"] == NUMBER
            assert json.loads(body)["pull_request"]["head"]["sha"] == head
    finally:
        await github.stop()

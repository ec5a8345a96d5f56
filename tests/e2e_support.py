"""Helpers for end-to-end tests: run the real services in the test's event loop."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from services.dequeuer.service import Dequeuer
from services.webhook.app import create_app
from services.webhook.keys import BROKER
from services.worker.consumer import Worker
from shared.broker import Broker
from shared.config import Settings
from shared.github import GitHub
from shared.storage import Storage, open_storage

FIXTURES = Path(__file__).parent / "fixtures"
REPO = "Codertocat/Hello-World"


def push_body(paths: list[str], sha: str, *, repo: str = REPO) -> bytes:
    """GitHub's real branch-push payload, rewritten to add ``paths`` at ``sha``."""
    payload: dict[str, Any] = json.loads(
        (FIXTURES / "github" / "push.with-new-branch.payload.json").read_text()
    )
    payload = copy.deepcopy(payload)
    payload["after"] = sha
    payload["repository"]["full_name"] = repo
    payload["commits"] = [{
        "id": sha, "tree_id": sha, "distinct": True, "message": "Update sources",
        "timestamp": "2026-11-22T10:00:00Z", "url": f"https://github.com/{repo}/commit/{sha}",
        "author": {"name": "Codertocat", "email": "c@example.com", "username": "Codertocat"},
        "committer": {"name": "Codertocat", "email": "c@example.com", "username": "Codertocat"},
        "added": paths, "removed": [], "modified": [],
    }]
    payload["head_commit"] = payload["commits"][0]
    return json.dumps(payload).encode()


def signed_headers(body: bytes, secret: str, *, event: str = "push",
                   delivery: str | None = None) -> dict[str, str]:
    signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {
        "Content-Type": "application/json", "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()), "X-Hub-Signature-256": signature,
    }


def new_sha() -> str:
    return hashlib.sha1(uuid.uuid4().bytes).hexdigest()


@dataclass
class System:
    client: TestClient[Any, Any]
    storage: Storage
    settings: Settings


@asynccontextmanager
async def running_system(settings: Settings) -> AsyncIterator[System]:
    """The webhook on a real loopback port, plus a worker and a dequeuer, all real."""
    app = create_app(settings)
    server = TestServer(app, host="127.0.0.1")
    client = TestClient(server)
    await client.start_server()
    await app[BROKER].wait_ready(timeout_s=30)
    worker_broker = await Broker.connect(settings.amqp_url)
    dequeuer_broker = await Broker.connect(settings.amqp_url, prefetch=8)
    github = GitHub.open(settings.github_api_url, None)
    from shared.db import create_pool

    pool = await create_pool(settings.database_url)
    async with open_storage(settings) as storage:
        worker = Worker(settings, worker_broker, storage)
        dequeuer = Dequeuer(settings, pool, dequeuer_broker, github)
        tasks = [asyncio.create_task(worker.run()), asyncio.create_task(dequeuer.run())]
        try:
            yield System(client, storage, settings)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await worker_broker.close()
            await dequeuer_broker.close()
            await github.close()
            await pool.close()
            await client.close()


async def wait_for(condition: Callable[[], Awaitable[bool]], *, timeout_s: float = 60.0,
                   what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


async def job_of(pool: Any, delivery: str, *, timeout_s: float = 60.0) -> int:
    """The job a stored delivery was made into, once the webhook's processor made it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job_id = await pool.fetchval(
            "SELECT job_id FROM deliveries WHERE delivery_id = $1 AND outcome = 'job'", delivery)
        if job_id is not None:
            return int(job_id)
        await asyncio.sleep(0.05)
    raise AssertionError(f"delivery {delivery} made no job in {timeout_s:g} s")

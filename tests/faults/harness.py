"""The whole system as real processes against servers of the test's own, for fault tests.

A :class:`System` holds, for one test: a fresh database on the module's own PostgreSQL, a fresh
virtual host on the module's own RabbitMQ node, a storage folder, GitHub and a data provider
played by real HTTP servers on 127.0.0.1, and the services started as ``python -m services``
processes (:mod:`tests.support.processes`). Blocking server operations (stop, start, kill) go
through :func:`asyncio.to_thread`, so the stand-ins keep answering meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import aiohttp
import asyncpg

from services.demo.github import GitHubStandIn
from shared.db import init_connection
from tests.e2e_support import REPO, new_sha, push_body, signed_headers
from tests.support.dataserver import DataServer
from tests.support.processes import ServiceProcess, ServiceProcesses
from tests.support.servers import PostgresServer, RabbitServer

SECRET = "fault-secret"
ROWS = b"lon,lat,number,street\n-100.1,38.1,1,Elm St\n-100.2,38.2,2,Oak Ave\n"

#: Timings shortened so that recovery happens within a test's patience, in the same ratio as
#: the defaults (lease = several heartbeats).
FAST = {
    "WORKER_HEARTBEAT_S": "1",
    "RUN_LEASE_S": "8",
    "WORKER_GRACE_S": "30",
    "RUN_RETRY_DELAY_S": "2",
}


def source_json(url: str) -> bytes:
    entry: dict[str, Any] = {
        "name": "city", "data": url, "protocol": "http",
        "conform": {"format": "csv", "lon": "lon", "lat": "lat", "number": "number",
                    "street": "street"},
    }
    source: dict[str, Any] = {"schema": 2, "coverage": {"country": "us", "state": "ks"},
                              "layers": {"addresses": [entry]}}
    return json.dumps(source).encode()


@dataclass
class System:
    """One test's system; see the module docstring."""

    postgres: PostgresServer
    rabbit: RabbitServer
    database_url: str
    amqp_url: str
    storage_dir: Path
    work_root: Path
    processes: ServiceProcesses
    github: GitHubStandIn
    data: DataServer
    extra_env: dict[str, str] = field(default_factory=dict)
    webhook: ServiceProcess | None = None

    def env(self, **overrides: str) -> dict[str, str]:
        return {
            "DATABASE_URL": self.database_url, "AMQP_URL": self.amqp_url,
            "STORAGE_URL": self.storage_dir.as_uri(), "GITHUB_API_URL": self.github.url,
            "WEBHOOK_SECRETS": SECRET, "ALLOW_PRIVATE_URLS": "true",
            "PUBLIC_BASE_URL": "http://oa.example.org", **FAST, **self.extra_env, **overrides,
        }

    def start(self, name: str, args: list[str], **env: str) -> ServiceProcess:
        return self.processes.start(name, args, self.env(**env))

    def start_worker(self, name: str, **env: str) -> ServiceProcess:
        return self.start(name, ["worker"], WORKER_NAME=name,
                          WORK_DIR=str(self.work_root / name), **env)

    async def start_webhook(self, **env: str) -> ServiceProcess:
        self.webhook = self.start("webhook", ["webhook"], **env)
        await wait_until(self._webhook_up, timeout_s=60, what="the webhook to listen")
        return self.webhook

    async def _webhook_up(self) -> bool:
        try:
            async with aiohttp.ClientSession() as session, session.get(
                f"{self.webhook_url}/health/live"
            ) as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    @property
    def webhook_url(self) -> str:
        assert self.webhook is not None
        return f"http://127.0.0.1:{self.webhook.env['HTTP_PORT']}"

    async def push(
        self, count: int = 1, *, data_path: str = "/rows.csv", sha: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Push ``count`` new source files reading ``data_path``; returns (sha, answer)."""
        sha = sha or new_sha()
        url = self.data.url(data_path)
        paths = [f"sources/us/ks/t{uuid.uuid4().hex[:8]}.json" for _ in range(count)]
        for path in paths:
            self.github.add_file(REPO, path, sha, source_json(url))
        body = push_body(paths, sha)
        async with aiohttp.ClientSession() as session, session.post(
            f"{self.webhook_url}/hook", data=body, headers=signed_headers(body, SECRET),
            timeout=aiohttp.ClientTimeout(total=60),
        ) as response:
            answer = await response.json()
            assert response.status == 202, answer
        # The delivery is made into a job in the background: wait for it.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = await self.query(
                "SELECT job_id FROM deliveries WHERE delivery_id = $1 AND outcome = 'job'",
                answer["delivery"])
            if rows:
                answer["job"] = rows[0]["job_id"]
                answer["runs"] = len(await self.query(
                    "SELECT id FROM runs WHERE job_id = $1", answer["job"]))
                return sha, answer
            await asyncio.sleep(0.1)
        raise AssertionError(f"delivery {answer['delivery']} made no job")

    async def query(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.database_url, timeout=10)
        try:
            await init_connection(conn)
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    async def runs(self) -> list[asyncpg.Record]:
        return await self.query("SELECT * FROM runs ORDER BY id")

    async def all_settled(self, expected: int) -> bool:
        try:
            rows = await self.query("SELECT status FROM runs")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return False  # our own database may be down on purpose
        return len(rows) == expected and all(row["status"] is not None for row in rows)

    async def queue_ready(self, queue: str) -> int:
        connection = await aio_pika.connect(self.amqp_url, timeout=10)
        try:
            channel = await connection.channel()
            declared = await channel.declare_queue(queue, passive=True)
            return int(declared.declaration_result.message_count or 0)
        finally:
            await connection.close()


async def wait_until(
    condition: Callable[[], Awaitable[bool]], *, timeout_s: float, what: str,
    interval_s: float = 0.25,
) -> float:
    """Wait for ``condition``; returns the seconds it took. AssertionError after ``timeout_s``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if await condition():
            return time.monotonic() - started
        await asyncio.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


async def new_vhost(rabbit: RabbitServer) -> str:
    vhost = f"fault-{uuid.uuid4().hex[:10]}"
    await asyncio.to_thread(rabbit.ctl, "add_vhost", vhost)
    await asyncio.to_thread(rabbit.ctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    return f"{rabbit.url.rstrip('/')}/{quote(vhost, safe='')}"


def finished_events(process: ServiceProcess) -> dict[int, int]:
    """run id -> how many times the dequeuer logged ``run.finished`` for it."""
    counts: dict[int, int] = {}
    for event in process.events("run.finished"):
        counts[int(event["run_id"])] = counts.get(int(event["run_id"]), 0) + 1
    return counts


def all_alive(processes: Mapping[str, ServiceProcess]) -> list[str]:
    """Names of the processes that have exited."""
    return [name for name, process in processes.items() if not process.alive]

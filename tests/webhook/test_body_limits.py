"""A flood of unsigned 25 MB deliveries cannot exhaust the webhook's memory.

The webhook runs as a real process; its peak resident memory (``VmHWM``) is read from /proc
before and after twenty unsigned posts of 25 MB arrive at once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from services.webhook.routes import BODY_BUDGET_BYTES
from shared.config import Settings
from tests.support.processes import ServiceProcesses

BODY_BYTES = 25 * 1024 * 1024
POSTS = 20


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


@pytest.mark.timeout(180)
async def test_twenty_unsigned_25_mb_posts_read_at_most_a_few_bodies_at_once(
    settings: Settings, tmp_path: Path
) -> None:
    with ServiceProcesses(tmp_path / "logs") as processes:
        webhook = processes.start("webhook", ["webhook"], {
            "DATABASE_URL": settings.database_url, "AMQP_URL": settings.amqp_url,
            "STORAGE_URL": settings.storage_url, "WEBHOOK_SECRETS": "s3cret",
        })
        base = f"http://127.0.0.1:{webhook.env['HTTP_PORT']}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            for _ in range(200):
                try:
                    async with session.get(f"{base}/health/live") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            before = peak_rss_bytes(webhook.pid)
            body = b"{" + b" " * (BODY_BYTES - 2) + b"}"
            headers = {"X-GitHub-Event": "push", "X-GitHub-Delivery": "flood",
                       "X-Hub-Signature-256": "sha256=" + "0" * 64,
                       "Content-Type": "application/json"}

            async def post() -> int:
                async with session.post(f"{base}/hook", data=body, headers=headers) as response:
                    return response.status

            statuses = await asyncio.gather(*(post() for _ in range(POSTS)))
            # Without a signature header the body is not even read.
            async with session.post(f"{base}/hook", data=body, headers={
                    "X-GitHub-Event": "push", "Content-Type": "application/json"}) as response:
                unsigned = response.status
        after = peak_rss_bytes(webhook.pid)
    assert statuses == [401] * POSTS
    assert unsigned == 401
    grown = after - before
    # BODY_BUDGET_BYTES of bodies at a time (four of them), each held once or twice while read:
    # far below what twenty at once would take (POSTS * BODY_BYTES = 500 MiB before any copy).
    assert grown < 3 * BODY_BUDGET_BYTES, f"peak RSS grew by {grown / 2**20:.0f} MiB"

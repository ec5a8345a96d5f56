"""`oa-machine up` as a real process: what a person sees on the screen.

Demo mode on a database of its own and the session's vhost; RabbitMQ's management UI played
by a small HTTP server on a free port.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from aiohttp import web

from services.up import answers
from tests.conftest import POSTGRES_SERVER_URL
from tests.support.processes import ServiceProcess, ServiceProcesses

pytestmark = pytest.mark.timeout(180)

#: Every line of `up`: a service's name, right-aligned, a bar, the text.
PREFIXED = re.compile(r" *(up|webhook|worker|dequeuer|scheduler) \| (.*)")


@pytest.fixture
async def management_ui() -> AsyncIterator[str]:
    """A stand-in for RabbitMQ's management UI: its page, on 127.0.0.1."""
    async def page(_request: web.Request) -> web.Response:
        return web.Response(text="RabbitMQ Management")

    app = web.Application()
    app.router.add_get("/", page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/"
    finally:
        await runner.cleanup()


@pytest.fixture
async def fresh_database_url() -> AsyncIterator[str]:
    """A database name nobody uses; `up` creates and migrates it; dropped afterwards."""
    name = f"oa_test_up_{uuid.uuid4().hex[:12]}"
    yield f"{POSTGRES_SERVER_URL.rstrip('/')}/{name}"
    admin = await asyncpg.connect(f"{POSTGRES_SERVER_URL.rstrip('/')}/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def until_printed(process: ServiceProcess, pattern: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [line for line in list(process.lines) if re.search(pattern, line)]
        if found:
            return found[0]
        assert process.alive, process.output()
        await asyncio.sleep(0.1)
    raise AssertionError(f"no line matching {pattern!r} in {timeout_s} s\n{process.output()}")


async def test_up_prints_one_format_the_webhook_address_and_the_management_ui(
    fresh_database_url: str, amqp_url: str, management_ui: str, tmp_path: Path
) -> None:
    with ServiceProcesses(tmp_path / "logs") as processes:
        up = processes.start("up", ["up"], {
            "DATABASE_URL": fresh_database_url, "AMQP_URL": amqp_url,
            "STORAGE_URL": (tmp_path / "storage").as_uri(), "WORK_DIR": str(tmp_path / "work"),
            "RABBITMQ_MANAGEMENT_URL": management_ui,
        })
        port = up.env["HTTP_PORT"]
        url = f"http://127.0.0.1:{port}/"
        await until_printed(up, rf"webhook \| .*webhook\.listening .*url={re.escape(url)}", 90)
        await until_printed(up, r"up \| demo push delivered: job \d+", 90)
        await until_printed(up, rf"up \| RabbitMQ management UI at {re.escape(management_ui)}$",
                            30)
        assert up.stop(timeout_s=40) == 0, up.output()
    lines = up.lines
    assert any(re.search(rf"webhook \| .*webhook\.stopped .*url={re.escape(url)}", line)
               for line in lines), up.output()
    # One format: every line behind a service's prefix, none of them a raw JSON object.
    texts = []
    for line in lines:
        match = PREFIXED.fullmatch(line)
        assert match, f"unprefixed line {line!r}\n{up.output()}"
        texts.append(match.group(2))
    assert not [text for text in texts if text.lstrip().startswith("{")], up.output()
    # up's own log events are console lines too (the migrations, the stop).
    assert any(re.search(r"up \| .*\[info +\] db\.migrated", line) for line in lines)


async def test_the_management_ui_is_probed_not_assumed(management_ui: str) -> None:
    assert await answers(management_ui) is True
    with socket_closed() as closed:
        assert await answers(closed, timeout_s=1.0) is False


class socket_closed:
    """The URL of a port nothing listens on (bound, never listening, while in use)."""

    def __enter__(self) -> str:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}/"

    def __exit__(self, *exc_info: object) -> None:
        self._sock.close()

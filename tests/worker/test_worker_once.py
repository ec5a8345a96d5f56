"""`oa-machine worker --once`: one task, one run, then the process exits (one run per pod)."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from shared.broker import Broker
from shared.config import Settings
from shared.messages import EXCHANGE_TASKS, QUEUE_DONE, ROUTE_TASK, Done, Task
from tests.support.dataserver import DataServer

CSV = b"lon,lat,number,street\n-100.1,38.1,1,Elm St\n"


async def test_worker_once_processes_one_task_and_exits(
    settings: Settings, broker: Broker, tmp_path: pytest.TempPathFactory
) -> None:
    async with DataServer() as data:
        url = data.add("/a.csv", CSV)
        source = {"schema": 2, "coverage": {"country": "zz"}, "layers": {"addresses": [{
            "name": "city", "data": url, "protocol": "http",
            "conform": {"format": "csv", "lon": "lon", "lat": "lat", "number": "number",
                        "street": "street"}}]}}
        for run_id in (1, 2):
            await broker.publish(EXCHANGE_TASKS, ROUTE_TASK, Task(
                run_id=run_id, source_path="sources/zz/a.json", layer="addresses",
                entry_name="city", source=source))
        env = {
            **os.environ, "DATABASE_URL": settings.database_url, "AMQP_URL": settings.amqp_url,
            "STORAGE_URL": settings.storage_url, "ALLOW_PRIVATE_URLS": "true",
            "WORK_DIR": str(settings.work_dir), "LOG_FORMAT": "json",
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services", "worker", "--once", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, output.decode()[-3000:]
    messages = []
    while (message := await broker.get(QUEUE_DONE, timeout_s=2)) is not None:
        messages.append(message)
    done = [m for m in messages if isinstance(m, Done)]
    assert [(d.run_id, d.status) for d in done] == [(1, "success")]
    # The second task is still waiting for the next pod; drop it so no later test inherits it.
    assert (await broker.queue_depth("tasks"))[0] == 1
    await broker.purge("tasks")

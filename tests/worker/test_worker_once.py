"""`oa-machine worker --once`: one task, one run, then the process exits (one run per pod)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from shared.broker import Broker
from shared.config import Settings
from shared.messages import EXCHANGE_TASKS, QUEUE_DONE, QUEUE_TASKS, ROUTE_TASK, Done, Task
from tests.support.dataserver import DataServer
from tests.worker import fidelity

CSV = b"lon,lat,number,street\n-100.1,38.1,1,Elm St\n"


def worker_env(settings: Settings) -> dict[str, Any]:
    return {
        **os.environ, "DATABASE_URL": settings.database_url, "AMQP_URL": settings.amqp_url,
        "STORAGE_URL": settings.storage_url, "ALLOW_PRIVATE_URLS": "true",
        "WORK_DIR": str(settings.work_dir), "LOG_FORMAT": "json",
    }


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
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services", "worker", "--once", env=worker_env(settings),
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
    assert (await broker.queue_depth(QUEUE_TASKS))[0] == 1
    await broker.purge(QUEUE_TASKS)


async def test_worker_service_runs_every_fidelity_gap(
    settings: Settings, broker: Broker, tmp_path: Path
) -> None:
    # The entry `city[1]` of a file with two entries named `city` (tests/worker/fidelity.py):
    # the name the webhook stores, the worker resolves and index.json shows.
    async with DataServer() as data:
        url = data.add("/perrysburg.zip", fidelity.shapefile_zip(tmp_path))
        await broker.publish(EXCHANGE_TASKS, ROUTE_TASK, Task(
            run_id=7, source_path="us/oh/city_of_perrysburg", layer="addresses",
            entry_name="city[1]", source=fidelity.source(url)))
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services", "worker", "--once", env=worker_env(settings),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, output.decode()[-3000:]
    messages = []
    while (message := await broker.get(QUEUE_DONE, timeout_s=2)) is not None:
        messages.append(message)
    (done,) = [m for m in messages if isinstance(m, Done)]
    assert (done.run_id, done.status) == (7, "success"), done.error
    storage = Path(settings.storage_url.removeprefix("file://"))
    fidelity.check_outputs((storage / done.outputs["out.csv"]).read_text(), done.state)

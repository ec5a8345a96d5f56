"""A run's log is stored while the run is in progress, so its page shows how far it got."""

from __future__ import annotations

import asyncio

from services.worker.consumer import Worker
from shared.broker import Broker
from shared.config import Settings
from shared.errors import NotFound
from shared.messages import QUEUE_DONE, Done, Task
from shared.storage import open_storage
from tests.support.dataserver import DataServer

CSV = b"lon,lat,number,street\n-100.1,38.1,1,Elm St\n"


async def test_the_log_of_a_run_in_progress_is_stored_and_the_whole_log_at_its_end(
    settings: Settings, broker: Broker
) -> None:
    settings = settings.model_copy(update={"worker_live_log_s": 0.2})
    key = "runs/31/output.txt"
    async with open_storage(settings) as storage, DataServer() as data:
        # The provider takes 6 s to answer: the run is in progress meanwhile.
        url = data.add("/slow.csv", CSV, delay_s=6.0)
        source = {"schema": 2, "coverage": {"country": "zz"}, "layers": {"addresses": [{
            "name": "city", "data": url, "protocol": "http",
            "conform": {"format": "csv", "lon": "lon", "lat": "lat", "number": "number",
                        "street": "street"}}]}}
        worker = Worker(settings, broker, storage)
        running = asyncio.create_task(worker.handle(Task(
            run_id=31, source_path="sources/zz/slow.json", layer="addresses",
            entry_name="city", source=source)))
        live = b""
        for _ in range(1500):  # the run starts and asks for its data (a busy machine: slowly)
            await asyncio.sleep(0.02)
            if data.count("/slow.csv") == 1:
                break
        for _ in range(150):
            await asyncio.sleep(0.02)
            try:
                live = await storage.get_bytes(key)
                break
            except NotFound:
                continue
        assert live, "no log stored while the run was in progress"
        assert not running.done()
        assert data.count("/slow.csv") == 1  # still waiting for its download
        await asyncio.wait_for(running, 60)
        final = await storage.get_bytes(key)
    assert final.startswith(live) and len(final) > len(live)
    done = await broker.get(QUEUE_DONE, timeout_s=10)
    assert isinstance(done, Done) and (done.run_id, done.status) == (31, "success")
    assert done.outputs["output.txt"] == key

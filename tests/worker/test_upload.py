"""A run's outputs wait for storage to come back instead of being lost (real S3 API server)."""

from __future__ import annotations

import asyncio
import socket
import uuid
from pathlib import Path

import pytest
from moto.server import ThreadedMotoServer

from services.worker.consumer import Worker
from shared.broker import Broker
from shared.config import Settings
from shared.storage import S3Storage


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(120)
async def test_outputs_wait_for_storage_that_is_down_then_upload(
    settings: Settings, broker: Broker, tmp_path: Path, s3_server: str
) -> None:
    outdir = tmp_path / "out"
    outdir.mkdir()
    (outdir / "out.csv").write_bytes(b"LON,LAT\r\n1,2\r\n")
    (outdir / "index.json").write_text("{}")
    port = _free_port()
    storage = S3Storage(f"oa-test-{uuid.uuid4().hex[:12]}", "p",
                        endpoint_url=f"http://127.0.0.1:{port}")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    try:
        worker = Worker(settings, broker, storage)
        # Nothing listens on the port yet: the upload waits and tries again.
        upload = asyncio.create_task(worker._upload(42, outdir))
        await asyncio.sleep(2.5)
        assert not upload.done()
        server.start()
        await storage.create_bucket()
        outputs = await asyncio.wait_for(upload, 60)
        assert outputs == {"index.json": "runs/42/index.json", "out.csv": "runs/42/out.csv"}
        assert await storage.get_bytes("runs/42/out.csv") == b"LON,LAT\r\n1,2\r\n"
    finally:
        await storage.close()
        server.stop()

"""Uploads written as they go, ranged reads and sizes, on LocalStorage and S3Storage (moto's S3
server over HTTP)."""

from __future__ import annotations

import os

import pytest

from shared.errors import NotFound
from shared.storage import S3_MIN_PART_BYTES, S3Storage, Storage


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest) -> Storage:
    name = "local_storage" if request.param == "local" else "s3_storage"
    value = request.getfixturevalue(name)
    assert isinstance(value, Storage)
    if isinstance(value, S3Storage):
        value.upload_part_bytes = S3_MIN_PART_BYTES  # three parts below
    return value


async def test_upload_in_parts(storage: Storage) -> None:
    pieces = [os.urandom(1024 * 1024 + i) for i in range(12)]
    async with storage.open_upload("collections/a.zip", content_type="application/zip") as up:
        for piece in pieces:
            await up.write(piece)
    assert up.size_bytes == sum(map(len, pieces))
    assert await storage.get_bytes("collections/a.zip") == b"".join(pieces)
    assert await storage.size_of("collections/a.zip") == up.size_bytes
    if isinstance(storage, S3Storage):
        s3 = await storage._s3()
        uploads = await s3.list_multipart_uploads(Bucket=storage.bucket)
        assert not uploads.get("Uploads")


async def test_small_and_empty_uploads(storage: Storage) -> None:
    async with storage.open_upload("collections/small.txt") as up:
        await up.write(b"hello ")
        await up.write(b"world")
    assert await storage.get_bytes("collections/small.txt") == b"hello world"
    async with storage.open_upload("collections/empty.txt"):
        pass
    assert await storage.get_bytes("collections/empty.txt") == b""


async def test_failed_upload_leaves_nothing(storage: Storage) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        async with storage.open_upload("collections/broken.zip") as up:
            for _ in range(7):
                await up.write(os.urandom(1024 * 1024))
            raise RuntimeError("boom")
    assert not await storage.exists("collections/broken.zip")
    assert await storage.list_keys("collections/") == []
    if isinstance(storage, S3Storage):
        s3 = await storage._s3()
        uploads = await s3.list_multipart_uploads(Bucket=storage.bucket)
        assert not uploads.get("Uploads")


async def test_ranges(storage: Storage) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    await storage.put_bytes("runs/1/processed.zip", data)
    assert await storage.size_of("runs/1/processed.zip") == len(data)
    assert await storage.read_range("runs/1/processed.zip", 10, 100) == data[10:110]
    chunks = [c async for c in storage.stream_range("runs/1/processed.zip", 5, len(data) - 10)]
    assert len(chunks) > 1
    assert b"".join(chunks) == data[5:-5]
    # Past the end: what there is.
    assert await storage.read_range("runs/1/processed.zip", len(data) - 3, 100) == data[-3:]
    assert await storage.read_range("runs/1/processed.zip", 0, 0) == b""


async def test_ranges_of_missing_key(storage: Storage) -> None:
    with pytest.raises(NotFound):
        await storage.size_of("runs/9/nothing.zip")
    with pytest.raises(NotFound):
        await storage.read_range("runs/9/nothing.zip", 0, 10)


async def test_read_tail(storage: Storage) -> None:
    data = os.urandom(100_000)
    await storage.put_bytes("runs/2/processed.zip", data)
    assert await storage.read_tail("runs/2/processed.zip", 1000) == (data[-1000:], len(data))
    assert await storage.read_tail("runs/2/processed.zip", 10**6) == (data, len(data))
    with pytest.raises(NotFound):
        await storage.read_tail("runs/2/nothing.zip", 10)

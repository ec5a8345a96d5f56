"""One behaviour suite run against LocalStorage and S3Storage (moto's S3 server over HTTP)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.config import Settings
from shared.errors import NotFound, StorageError
from shared.storage import LocalStorage, S3Storage, Storage, open_storage


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest) -> Storage:
    """Each test below runs once per backend."""
    name = "local_storage" if request.param == "local" else "s3_storage"
    value = request.getfixturevalue(name)
    assert isinstance(value, Storage)
    return value


def _read(path: Path) -> bytes:
    # Sync on purpose: test files are small enough, and this keeps ASYNC240 quiet.
    return path.read_bytes()


@pytest.fixture
def big_file(tmp_path: Path) -> Path:
    """A 12 MiB file of random bytes (bigger than a multipart part)."""
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(12 * 1024 * 1024))
    return path


async def test_put_and_get_bytes(storage: Storage) -> None:
    await storage.put_bytes("runs/1/index.json", b'{"a": 1}', content_type="application/json")
    assert await storage.get_bytes("runs/1/index.json") == b'{"a": 1}'
    await storage.put_bytes("runs/1/index.json", b"replaced")
    assert await storage.get_bytes("runs/1/index.json") == b"replaced"


async def test_put_file_and_download(storage: Storage, big_file: Path, tmp_path: Path) -> None:
    await storage.put_file("runs/2/out.zip", big_file, content_type="application/zip")
    target = tmp_path / "down" / "out.zip"
    await storage.download("runs/2/out.zip", target)
    assert _read(target) == _read(big_file)
    # No temporary file left next to the download.
    assert [path.name for path in target.parent.iterdir()] == ["out.zip"]


async def test_stream(storage: Storage, big_file: Path) -> None:
    await storage.put_file("runs/3/out.csv", big_file)
    chunks = [chunk async for chunk in storage.stream("runs/3/out.csv")]
    assert len(chunks) > 1
    assert b"".join(chunks) == _read(big_file)


async def test_exists_and_delete(storage: Storage) -> None:
    assert not await storage.exists("runs/4/a.txt")
    await storage.put_bytes("runs/4/a.txt", b"a")
    assert await storage.exists("runs/4/a.txt")
    await storage.delete("runs/4/a.txt")
    assert not await storage.exists("runs/4/a.txt")
    await storage.delete("runs/4/a.txt")  # deleting a missing key is fine


async def test_list_keys_with_prefix(storage: Storage) -> None:
    for key in ("runs/10/a", "runs/10/b/c", "runs/100/a", "runs/2/a", "other"):
        await storage.put_bytes(key, key.encode())
    assert await storage.list_keys("runs/10/") == ["runs/10/a", "runs/10/b/c"]
    assert await storage.list_keys("runs/10") == ["runs/10/a", "runs/10/b/c", "runs/100/a"]
    assert await storage.list_keys("") == sorted(
        ["other", "runs/10/a", "runs/10/b/c", "runs/100/a", "runs/2/a"]
    )
    assert await storage.list_keys("nothing/") == []


async def test_missing_key_is_not_found(storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        await storage.get_bytes("runs/5/missing")
    with pytest.raises(NotFound):
        await storage.download("runs/5/missing", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(NotFound):
        async for _chunk in storage.stream("runs/5/missing"):
            pass


@pytest.mark.parametrize(
    "key", ["", "/etc/passwd", "../escape", "runs/../../escape", "runs//a", "a\\b", "runs/./a"]
)
async def test_bad_keys_are_refused(storage: Storage, key: str) -> None:
    with pytest.raises(StorageError):
        await storage.put_bytes(key, b"x")
    with pytest.raises(StorageError):
        await storage.get_bytes(key)


async def test_local_storage_cannot_escape_its_directory(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret").write_bytes(b"secret")
    # A symlink inside the root pointing outside is refused too.
    (root / "link").symlink_to(tmp_path)
    storage = LocalStorage(root)
    for key in ("../secret", "link/secret"):
        with pytest.raises(StorageError):
            await storage.get_bytes(key)
    with pytest.raises(StorageError):
        await storage.put_bytes("link/new", b"x")
    assert not (tmp_path / "new").exists()


async def test_local_writes_leave_no_temporary_files(local_storage: LocalStorage) -> None:
    await local_storage.put_bytes("a/b", b"1")
    await local_storage.put_bytes("a/b", b"2")
    assert sorted(path.name for path in (local_storage.root / "a").iterdir()) == ["b"]


async def test_s3_multipart_upload(s3_storage: S3Storage, big_file: Path, tmp_path: Path) -> None:
    # Lower the threshold so the 12 MiB file goes up in three parts (S3's minimum is 5 MiB).
    s3_storage.multipart_threshold_bytes = 8 * 1024 * 1024
    s3_storage.multipart_part_bytes = 5 * 1024 * 1024
    await s3_storage.put_file("runs/6/big.bin", big_file)
    await s3_storage.download("runs/6/big.bin", tmp_path / "copy")
    assert _read(tmp_path / "copy") == _read(big_file)


async def test_s3_prefix_is_applied(s3_server: str, s3_storage: S3Storage) -> None:
    await s3_storage.put_bytes("k", b"v")
    # Same bucket without the prefix sees the object under prefix/.
    bare = S3Storage(s3_storage.bucket, endpoint_url=s3_server)
    try:
        assert await bare.list_keys("") == ["prefix/k"]
        assert await s3_storage.list_keys("") == ["k"]
    finally:
        await bare.close()


async def test_s3_errors_are_translated(s3_server: str) -> None:
    storage = S3Storage("no-such-bucket-oa", endpoint_url=s3_server)
    try:
        with pytest.raises(StorageError):
            await storage.put_bytes("k", b"v")
    finally:
        await storage.close()


async def test_open_storage_local(tmp_path: Path) -> None:
    settings = Settings(storage_url=(tmp_path / "store").as_uri())
    async with open_storage(settings) as storage:
        assert isinstance(storage, LocalStorage)
        await storage.put_bytes("x", b"1")
    assert (tmp_path / "store" / "x").read_bytes() == b"1"


async def test_open_storage_s3(s3_server: str, s3_storage: S3Storage) -> None:
    settings = Settings(
        storage_url=f"s3://{s3_storage.bucket}/other/prefix", s3_endpoint_url=s3_server
    )
    async with open_storage(settings) as storage:
        assert isinstance(storage, S3Storage)
        assert storage.prefix == "other/prefix/"
        await storage.put_bytes("y", b"2")
        assert await storage.get_bytes("y") == b"2"

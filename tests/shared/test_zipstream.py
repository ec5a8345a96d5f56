"""Zips written front to back, and members copied raw between zips: checked by reading the
results with Python's zipfile and, where installed, Info-ZIP's unzip -t."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared import zipstream
from shared.zipstream import ZipError, ZipWriter, data_offset, read_members


class MemorySink:
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.writes = 0

    async def write(self, data: bytes) -> None:
        self.buffer += data
        self.writes += 1


def reader(data: bytes) -> zipstream.ReadRange:
    async def read_range(offset: int, length: int) -> bytes:
        return data[offset: offset + length]
    return read_range


async def chunks(data: bytes, size: int = 7919) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start: start + size]


CSV = b"".join(b"%d.5,%d.25,%d,MAIN ST,,,,,,,h%d\r\n" % (i % 360 - 180, i % 170 - 85, i, i)
               for i in range(20_000))


def processed_zip() -> bytes:
    """Like the worker's processed.zip: README, VRT, and the CSV written through a stream."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as out:
        out.writestr("README.txt", "read me\n")
        out.writestr("us/ks/lane_county.vrt", "<OGRVRTDataSource/>\n")
        with out.open("us/ks/lane_county.csv", "w", force_zip64=True) as member:
            member.write(CSV)
        out.writestr("stored.txt", "as is", compress_type=zipfile.ZIP_STORED)
    return buffer.getvalue()


def unseekable_zip() -> bytes:
    """Written to a pipe-like stream: every member has a data descriptor."""

    class Unseekable(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b: bytes) -> int:  # type: ignore[override]
            self.data += b
            return len(b)

    stream = Unseekable()
    with zipfile.ZipFile(stream, "w", compression=zipfile.ZIP_DEFLATED) as out:
        out.writestr("a/é.txt", "accented name\n" * 100)
    return bytes(stream.data)


async def copy_all(source: bytes, writer: ZipWriter, prefix: str = "") -> None:
    read_range = reader(source)
    for member in await read_members(read_range, len(source)):
        start = await data_offset(read_range, member)
        body = source[start: start + member.compressed_size]
        await writer.add_raw(prefix + member.name, chunks(body), method=member.method,
                             crc=member.crc, compressed_size=member.compressed_size,
                             size=member.size)


def unzip_test(data: bytes, tmp_path: Path) -> None:
    if shutil.which("unzip") is None:
        return
    path = tmp_path / "check.zip"
    path.write_bytes(data)
    result = subprocess.run(["unzip", "-tq", str(path)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_read_members_of_a_processed_zip() -> None:
    source = processed_zip()
    members = await read_members(reader(source), len(source))
    with zipfile.ZipFile(io.BytesIO(source)) as expected:
        infos = expected.infolist()
    assert [m.name for m in members] == [i.filename for i in infos]
    for member, info in zip(members, infos, strict=True):
        assert (member.crc, member.compressed_size, member.size, member.header_offset,
                member.method) == (info.CRC, info.compress_size, info.file_size,
                                   info.header_offset, info.compress_type)


async def test_raw_copy_bytes_and_stream(tmp_path: Path) -> None:
    sink = MemorySink()
    writer = ZipWriter(sink)
    await writer.add_bytes("README.txt", b"collection\n")
    await copy_all(processed_zip(), writer, prefix="one/")
    await copy_all(unseekable_zip(), writer, prefix="two/")
    geojson = b'{"type":"Feature"}\n' * 50_000
    assert await writer.add_stream("layers/x.geojson", chunks(geojson, 65536)) == len(geojson)
    await writer.add_bytes("stored.bin", b"\x00" * 10, compress=False)
    await writer.close()
    data = bytes(sink.buffer)
    assert writer.size_bytes == len(data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        assert archive.namelist() == writer.names == [
            "README.txt", "one/README.txt", "one/us/ks/lane_county.vrt",
            "one/us/ks/lane_county.csv", "one/stored.txt", "two/a/é.txt", "layers/x.geojson",
            "stored.bin",
        ]
        assert archive.read("one/us/ks/lane_county.csv") == CSV
        assert archive.read("two/a/é.txt") == b"accented name\n" * 100
        assert archive.read("layers/x.geojson") == geojson
        assert archive.read("one/stored.txt") == b"as is"
        assert archive.read("README.txt") == b"collection\n"
        # The copied member is the source's deflate stream, byte for byte.
        assert archive.getinfo("one/us/ks/lane_county.csv").compress_type == zipfile.ZIP_DEFLATED
    unzip_test(data, tmp_path)
    # Our own output reads back through the same directory reader.
    again = await read_members(reader(data), len(data))
    assert [m.name for m in again] == writer.names


async def test_zip64_fields(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Sizes, offsets and the count past these limits take the zip64 fields, as past 4 GiB.
    monkeypatch.setattr(zipstream, "ZIP64_LIMIT", 100)
    monkeypatch.setattr(zipstream, "ZIP64_COUNT_LIMIT", 3)
    sink = MemorySink()
    writer = ZipWriter(sink)
    await copy_all(processed_zip(), writer)
    await writer.add_stream("big.txt", chunks(b"x" * 5000))
    await writer.close()
    data = bytes(sink.buffer)
    assert b"PK\x06\x06" in data and b"PK\x06\x07" in data
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        assert archive.read("us/ks/lane_county.csv") == CSV
        assert archive.read("big.txt") == b"x" * 5000
    members = await read_members(reader(data), len(data))
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for member, info in zip(members, archive.infolist(), strict=True):
            assert (member.size, member.compressed_size, member.header_offset) == (
                info.file_size, info.compress_size, info.header_offset)
    unzip_test(data, tmp_path)


async def test_wrong_sizes_and_names_refused() -> None:
    writer = ZipWriter(MemorySink())
    with pytest.raises(ZipError, match="copied"):
        await writer.add_raw("a", chunks(b"abc"), method=0, crc=0, compressed_size=4, size=4)
    with pytest.raises(ZipError, match="more than"):
        await writer.add_raw("b", chunks(b"abcde"), method=0, crc=0, compressed_size=4,
                             size=4)
    await writer.add_bytes("c", b"")
    for bad in ("c", "", "/abs", "back\\slash"):
        with pytest.raises(ZipError):
            await writer.add_bytes(bad, b"")


async def test_not_a_zip() -> None:
    junk = os.urandom(1000).replace(b"PK", b"pk")
    with pytest.raises(ZipError, match="not a zip"):
        await read_members(reader(junk), len(junk))
    with pytest.raises(ZipError, match="not a zip"):
        await read_members(reader(b""), 0)


async def test_bad_local_header() -> None:
    source = processed_zip()
    member = (await read_members(reader(source), len(source)))[0]
    moved = zipstream.Member(member.name, member.method, member.flags, member.crc,
                             member.compressed_size, member.size, member.header_offset + 1)
    with pytest.raises(ZipError, match="no local header"):
        await data_offset(reader(source), moved)


@pytest.mark.parametrize("chunk_size", [1, 29, 31, 4096, 10**7])
async def test_member_data_skips_the_local_header(chunk_size: int) -> None:
    source = processed_zip()
    for member in await read_members(reader(source), len(source)):
        start = await data_offset(reader(source), member)
        # A read from the header on that runs past the member: only its bytes come out.
        rest = source[member.header_offset:]
        got = b"".join([piece async for piece in zipstream.member_data(
            chunks(rest, chunk_size), member)])
        assert got == source[start: start + member.compressed_size]


async def test_member_data_short_read() -> None:
    source = processed_zip()
    member = (await read_members(reader(source), len(source)))[-2]
    cut = source[member.header_offset: member.header_offset + 100]
    with pytest.raises(ZipError, match="short"):
        async for _ in zipstream.member_data(chunks(cut), member):
            pass


async def test_read_members_from_a_given_tail() -> None:
    source = processed_zip()
    calls: list[tuple[int, int]] = []

    async def counted(offset: int, length: int) -> bytes:
        calls.append((offset, length))
        return source[offset: offset + length]

    members = await read_members(counted, len(source), tail=source[-4096:])
    assert calls == [] and [m.name for m in members][-1] == "stored.txt"
    # A tail too short for the directory: the directory is read on its own.
    members = await read_members(counted, len(source), tail=source[-30:])
    assert len(calls) >= 1 and len(members) == 4

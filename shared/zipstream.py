"""Zip archives written front to back, and members copied between zips without recompressing.

A collection is a zip of many runs' data, uploaded while it is written, so it is never seekable
and never whole anywhere. Python's :mod:`zipfile` writes only to a seekable file (or spends a
data descriptor on every member) and cannot add a member from another zip's compressed bytes,
so this module does both:

* :class:`ZipWriter` appends members to an async sink (an upload) and ends with the central
  directory. A member is either *copied raw*: its deflate stream from another zip, with the
  CRC and sizes that zip's central directory gives (:meth:`ZipWriter.add_raw`, no CPU spent on
  the data), *bytes* held in memory (README, LICENSE) or *streamed*: deflated as its chunks
  arrive, with a data descriptor after it, since its CRC and sizes are known only at its end.
* :func:`read_members` reads a zip's central directory through range reads (its tail, then the
  directory), and :func:`data_offset` finds where a member's data begins from its local header.

Zip64 (APPNOTE 4.5.3) is used where a size, an offset or the member count needs it, so a
global collection may pass 4 GiB; streamed members always carry it, their size being unknown
when their header is written. Names are UTF-8 (flag bit 11).
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Protocol

from isal import isal_zlib

STORED: Final = 0
DEFLATED: Final = 8
#: Sizes and offsets at or above this need zip64 fields (a module constant so that tests can
#: lower it and check the zip64 layout without writing 4 GiB).
ZIP64_LIMIT: int = 0xFFFFFFFF
ZIP64_COUNT_LIMIT: int = 0xFFFF
#: ISA-L level 1: as small as zlib's level 1, several times faster (see the worker's writers).
DEFLATE_LEVEL: Final = 1
_UTF8: Final = 0x0800
_DESCRIPTOR: Final = 0x0008
_VERSION_ZIP64: Final = 45
_VERSION_DEFAULT: Final = 20
#: Made by: Unix (3), spec 4.5, so that unzip reads the permission bits we set.
_MADE_BY: Final = (3 << 8) | _VERSION_ZIP64
_FILE_MODE: Final = (0o100644 << 16)
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_EOCD = struct.Struct("<IHHHHIIH")
_EOCD64 = struct.Struct("<IQHHIIQQQQ")
_LOCATOR64 = struct.Struct("<IIQI")
_LOCAL_SIG, _CENTRAL_SIG, _EOCD_SIG = 0x04034B50, 0x02014B50, 0x06054B50
_EOCD64_SIG, _LOCATOR64_SIG, _DESCRIPTOR_SIG = 0x06064B50, 0x07064B50, 0x08074B50
#: The end record and the longest comment it may have: all that is read to find it.
_TAIL_BYTES: Final = _EOCD.size + 0xFFFF + _LOCATOR64.size


class ZipError(ValueError):
    """The bytes are not a zip this module can read (or a member is not where it says)."""


class Sink(Protocol):
    """Where an archive's bytes go, in order (e.g. :class:`shared.storage.Upload`)."""

    async def write(self, data: bytes) -> None: ...


@dataclass(frozen=True)
class Member:
    """A member as another zip's central directory describes it."""

    name: str
    method: int
    flags: int
    crc: int
    compressed_size: int
    size: int
    header_offset: int


@dataclass
class _Written:
    name: bytes
    method: int
    flags: int
    crc: int
    compressed_size: int
    size: int
    offset: int
    dos_time: int
    dos_date: int


def _dos_stamp(when: float) -> tuple[int, int]:
    t = time.gmtime(when)
    year = max(t.tm_year, 1980)
    return ((t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2),
            ((year - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday)


class ZipWriter:
    """Appends members to ``sink``; :meth:`close` writes the central directory.

    Members are written one at a time, in the order of the calls (await each). ``when`` is
    the time stamped on every member (default: now).
    """

    def __init__(self, sink: Sink, *, when: float | None = None) -> None:
        self._sink = sink
        self._offset = 0
        self._members: list[_Written] = []
        self._names: set[str] = set()
        self._dos_time, self._dos_date = _dos_stamp(time.time() if when is None else when)
        self._closed = False

    @property
    def size_bytes(self) -> int:
        """Bytes written so far."""
        return self._offset

    @property
    def names(self) -> list[str]:
        """The members' names, in order."""
        return [member.name.decode() for member in self._members]

    async def _write(self, data: bytes) -> None:
        if data:
            await self._sink.write(data)
            self._offset += len(data)

    def _claim(self, name: str) -> bytes:
        if self._closed:
            raise ZipError("the archive is closed")
        if not name or name.startswith("/") or "\\" in name or name in self._names:
            raise ZipError(f"bad or duplicate member name {name!r}")
        self._names.add(name)
        return name.encode()

    async def add_raw(self, name: str, data: AsyncIterator[bytes], *, method: int, crc: int,
                      compressed_size: int, size: int) -> None:
        """Copy a member's compressed bytes as they are, with the CRC and sizes its own
        zip's central directory states; a short or long stream raises :class:`ZipError`."""
        encoded = self._claim(name)
        member = _Written(encoded, method, _UTF8, crc, compressed_size, size, self._offset,
                          self._dos_time, self._dos_date)
        await self._write(self._local_header(member, zip64=compressed_size >= ZIP64_LIMIT
                                             or size >= ZIP64_LIMIT))
        copied = 0
        async for chunk in data:
            copied += len(chunk)
            if copied > compressed_size:
                raise ZipError(f"{name}: more than the {compressed_size} bytes stated")
            await self._write(chunk)
        if copied != compressed_size:
            raise ZipError(f"{name}: {copied} bytes copied, {compressed_size} stated")
        self._members.append(member)

    async def add_bytes(self, name: str, data: bytes, *, compress: bool = True) -> None:
        """A small member held in memory (deflated unless ``compress`` is false)."""
        encoded = self._claim(name)
        body = _deflate_all(data) if compress else data
        member = _Written(encoded, DEFLATED if compress else STORED, _UTF8,
                          isal_zlib.crc32(data), len(body), len(data), self._offset,
                          self._dos_time, self._dos_date)
        await self._write(self._local_header(member, zip64=False))
        await self._write(body)
        self._members.append(member)

    async def add_stream(self, name: str, data: AsyncIterator[bytes]) -> int:
        """Deflate ``data`` into a member as it arrives (on a thread: the loop stays free);
        returns the uncompressed size."""
        encoded = self._claim(name)
        member = _Written(encoded, DEFLATED, _UTF8 | _DESCRIPTOR, 0, 0, 0, self._offset,
                          self._dos_time, self._dos_date)
        await self._write(self._local_header(member, zip64=True))
        compressor = isal_zlib.compressobj(DEFLATE_LEVEL, isal_zlib.DEFLATED, -15)
        crc, size, compressed = 0, 0, 0
        async for chunk in data:
            crc = isal_zlib.crc32(chunk, crc)
            size += len(chunk)
            out = await asyncio.to_thread(compressor.compress, chunk)
            compressed += len(out)
            await self._write(out)
        tail = compressor.flush()
        compressed += len(tail)
        await self._write(tail)
        member.crc, member.size, member.compressed_size = crc, size, compressed
        await self._write(struct.pack("<IIQQ", _DESCRIPTOR_SIG, crc, compressed, size))
        self._members.append(member)
        return size

    def _local_header(self, member: _Written, *, zip64: bool) -> bytes:
        extra = b""
        sizes = (member.compressed_size, member.size)
        version = _VERSION_DEFAULT
        if zip64:
            extra = struct.pack("<HHQQ", 1, 16, member.size, member.compressed_size)
            sizes = (0xFFFFFFFF, 0xFFFFFFFF)
            version = _VERSION_ZIP64
        return _LOCAL.pack(
            _LOCAL_SIG, version, member.flags, member.method, member.dos_time, member.dos_date,
            member.crc, *sizes, len(member.name), len(extra),
        ) + member.name + extra

    async def close(self) -> None:
        """Write the central directory and the end records."""
        if self._closed:
            return
        self._closed = True
        start = self._offset
        for member in self._members:
            await self._write(self._central_header(member))
        directory_size = self._offset - start
        count = len(self._members)
        if count >= ZIP64_COUNT_LIMIT or start >= ZIP64_LIMIT or directory_size >= ZIP64_LIMIT:
            end64 = self._offset
            await self._write(_EOCD64.pack(
                _EOCD64_SIG, _EOCD64.size - 12, _MADE_BY, _VERSION_ZIP64, 0, 0, count, count,
                directory_size, start,
            ))
            await self._write(_LOCATOR64.pack(_LOCATOR64_SIG, 0, end64, 1))
            await self._write(_EOCD.pack(_EOCD_SIG, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF,
                                         0xFFFFFFFF, 0))
        else:
            await self._write(_EOCD.pack(_EOCD_SIG, 0, 0, count, count, directory_size, start,
                                         0))

    @staticmethod
    def _central_header(member: _Written) -> bytes:
        fields = [member.size, member.compressed_size, member.offset]
        wide = [value for value in fields if value >= ZIP64_LIMIT]
        size, compressed, offset = (min(value, 0xFFFFFFFF) for value in fields)
        extra = struct.pack(f"<HH{len(wide)}Q", 1, 8 * len(wide), *wide) if wide else b""
        version = _VERSION_ZIP64 if wide else _VERSION_DEFAULT
        return _CENTRAL.pack(
            _CENTRAL_SIG, _MADE_BY, version, member.flags, member.method, member.dos_time,
            member.dos_date, member.crc, compressed, size, len(member.name), len(extra), 0, 0,
            0, _FILE_MODE, offset,
        ) + member.name + extra


def _deflate_all(data: bytes) -> bytes:
    compressor = isal_zlib.compressobj(DEFLATE_LEVEL, isal_zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush()


# --- reading another zip ------------------------------------------------------------------------

ReadRange = Callable[[int, int], Awaitable[bytes]]


async def read_members(read_range: ReadRange, size_bytes: int, *,
                       tail: bytes | None = None) -> list[Member]:
    """The members of the zip of ``size_bytes`` bytes that ``read_range(offset, length)``
    reads: its end records from the tail (``tail``: its last bytes, when read already), then
    its central directory."""
    if tail is None or (b"PK\x05\x06" not in tail and len(tail) < min(size_bytes, _TAIL_BYTES)):
        tail_start = max(0, size_bytes - _TAIL_BYTES)
        tail = await read_range(tail_start, size_bytes - tail_start)
    tail_start = size_bytes - len(tail)
    at = tail.rfind(struct.pack("<I", _EOCD_SIG))
    if at < 0 or len(tail) - at < _EOCD.size:
        raise ZipError("no end of central directory record: not a zip")
    (_sig, _disk, _cd_disk, _here, count, directory_size, directory_offset,
     _comment) = _EOCD.unpack_from(tail, at)
    locator_at = at - _LOCATOR64.size
    if locator_at >= 0 and struct.unpack_from("<I", tail, locator_at)[0] == _LOCATOR64_SIG:
        end64_offset = _LOCATOR64.unpack_from(tail, locator_at)[2]
        end64 = await read_range(end64_offset, _EOCD64.size)
        fields = _EOCD64.unpack(end64)
        if fields[0] != _EOCD64_SIG:
            raise ZipError("zip64 end record missing where its locator points")
        count, directory_size, directory_offset = fields[7], fields[8], fields[9]
    if directory_offset + directory_size > size_bytes:
        raise ZipError("the central directory lies beyond the end of the file")
    if directory_offset >= tail_start:
        directory = tail[directory_offset - tail_start: directory_offset - tail_start
                         + directory_size]
    else:
        directory = await read_range(directory_offset, directory_size)
    return _parse_directory(directory, count)


def _parse_directory(directory: bytes, count: int) -> list[Member]:
    members: list[Member] = []
    at = 0
    for _ in range(count):
        if at + _CENTRAL.size > len(directory):
            raise ZipError("the central directory is cut short")
        (sig, _made, _needed, flags, method, _t, _d, crc, compressed, size, name_len, extra_len,
         comment_len, _disk, _internal, _external, offset) = _CENTRAL.unpack_from(directory, at)
        if sig != _CENTRAL_SIG:
            raise ZipError("bad central directory entry")
        at += _CENTRAL.size
        raw_name = directory[at: at + name_len]
        extra = directory[at + name_len: at + name_len + extra_len]
        at += name_len + extra_len + comment_len
        size, compressed, offset = _zip64_values(extra, size, compressed, offset)
        name = raw_name.decode("utf-8" if flags & _UTF8 else "cp437")
        members.append(Member(name, method, flags, crc, compressed, size, offset))
    return members


def _zip64_values(extra: bytes, size: int, compressed: int, offset: int) -> tuple[int, int, int]:
    at = 0
    while at + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, at)
        if kind == 1:
            values = list(struct.unpack_from(f"<{length // 8}Q", extra, at + 4))
            # Only the fields set to all ones in the fixed header are present, in this order.
            if size == 0xFFFFFFFF and values:
                size = values.pop(0)
            if compressed == 0xFFFFFFFF and values:
                compressed = values.pop(0)
            if offset == 0xFFFFFFFF and values:
                offset = values.pop(0)
            break
        at += 4 + length
    return size, compressed, offset


#: Bytes to read at a member's offset to find where its data starts: the fixed local header
#: plus room for a name and extra field of usual length (a longer pair is read again).
LOCAL_HEADER_PROBE_BYTES: Final = _LOCAL.size + 1024


#: The fixed part of a local header: a member's bytes begin after it, its name and extra field.
LOCAL_HEADER_BYTES: Final = _LOCAL.size


def local_header_length(header: bytes, member: Member) -> int:
    """The length of ``member``'s local header, from its first 30 (or more) bytes."""
    if len(header) < _LOCAL.size or struct.unpack_from("<I", header)[0] != _LOCAL_SIG:
        raise ZipError(f"{member.name}: no local header at {member.header_offset}")
    name_len, extra_len = struct.unpack_from("<HH", header, 26)
    return _LOCAL.size + name_len + extra_len


async def member_data(chunks: AsyncIterator[bytes], member: Member) -> AsyncIterator[bytes]:
    """The compressed bytes of ``member`` out of ``chunks``, a read of its zip from its local
    header on: the header is skipped as it passes, so one request serves both."""
    pending = b""
    skip: int | None = None
    left = member.compressed_size
    async for chunk in chunks:
        if skip is None:
            pending += chunk
            if len(pending) < _LOCAL.size:
                continue
            skip = local_header_length(pending, member)
            chunk, pending = pending, b""
        if skip:
            dropped = min(skip, len(chunk))
            chunk, skip = chunk[dropped:], skip - dropped
        if not chunk:
            continue
        piece = chunk[:left]
        left -= len(piece)
        yield piece
        if left == 0:
            return
    if left:
        raise ZipError(f"{member.name}: the zip ends {left} bytes short")


async def data_offset(read_range: ReadRange, member: Member) -> int:
    """Where ``member``'s compressed data begins: after its local header, whose name and extra
    field lengths may differ from the central directory's."""
    header = await read_range(member.header_offset, LOCAL_HEADER_PROBE_BYTES)
    if len(header) < _LOCAL.size or struct.unpack_from("<I", header)[0] != _LOCAL_SIG:
        raise ZipError(f"{member.name}: no local header at {member.header_offset}")
    name_len, extra_len = struct.unpack_from("<HH", header, 26)
    return member.header_offset + _LOCAL.size + name_len + extra_len

"""Addresses per 0.1° cell, for a collection's ``summary/{region}-summary.csv``.

The counts come from the address CSVs themselves, read once per build while their deflated
bytes are copied into the first zip that holds them: :class:`CellCounter` inflates the chunks
it is fed on a thread and parses only ``LON`` and ``LAT`` (Arrow's CSV reader). A cell is
named by its south-west corner; its key is ``row * 3600 + column`` on the 3600 × 1800 grid.
"""

from __future__ import annotations

import asyncio
import functools
import io
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
from isal import isal_zlib

from shared.logging import get_logger

log = get_logger(__name__)

COLUMNS = 3600
ROWS = 1800
#: Compressed chunks waiting for the parser: the copy never runs far ahead of it.
_QUEUE_CHUNKS = 4
_END = b""


@dataclass(frozen=True)
class Cells:
    """Sparse counts: sorted cell keys and the addresses in each."""

    keys: np.ndarray
    counts: np.ndarray

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @staticmethod
    def empty() -> Cells:
        return Cells(np.zeros(0, np.int64), np.zeros(0, np.int64))

    @staticmethod
    def merge(parts: Iterable[Cells]) -> Cells:
        """One set of counts from many (the same cell's counts added)."""
        items = list(parts)
        if not items:
            return Cells.empty()
        keys = np.concatenate([part.keys for part in items])
        counts = np.concatenate([part.counts for part in items])
        unique, inverse = np.unique(keys, return_inverse=True)
        return Cells(unique, np.bincount(inverse, weights=counts, minlength=len(unique))
                     .astype(np.int64))


def cell_keys(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """The cell of each point (points off the globe are dropped)."""
    ok = np.isfinite(lon) & np.isfinite(lat) & (np.abs(lon) <= 180) & (np.abs(lat) <= 90)
    column = np.clip(np.floor((lon[ok] + 180.0) * 10).astype(np.int64), 0, COLUMNS - 1)
    row = np.clip(np.floor((lat[ok] + 90.0) * 10).astype(np.int64), 0, ROWS - 1)
    return row * COLUMNS + column


def summary_lines(cells: Cells, chunk_rows: int = 50_000) -> Iterator[bytes]:
    """The summary CSV: ``lon,lat,count`` per occupied cell (south-west corner), by row."""
    yield b"lon,lat,count\n"
    for start in range(0, len(cells.keys), chunk_rows):
        keys = cells.keys[start: start + chunk_rows]
        counts = cells.counts[start: start + chunk_rows]
        lons = (keys % COLUMNS) / 10.0 - 180.0
        lats = (keys // COLUMNS) / 10.0 - 90.0
        yield "".join(f"{lon:.1f},{lat:.1f},{count}\n"
                      for lon, lat, count in zip(lons.tolist(), lats.tolist(),
                                                 counts.tolist(), strict=True)).encode()


@functools.cache
def _use_system_allocator() -> None:
    """Arrow's default pool (mimalloc) keeps what each reader thread freed cached per thread:
    the scheduler's RSS grew with the size of the CSVs read. The system allocator returns it
    (as the worker's runs do, services/worker/run.py). Process-wide: the scheduler uses Arrow
    for nothing else."""
    pa.set_memory_pool(pa.system_memory_pool())


class _Inflating(io.RawIOBase):
    """A readable file of what the queue's chunks inflate to (raw deflate, or stored)."""

    def __init__(self, chunks: queue.Queue[bytes], deflated: bool) -> None:
        self._chunks = chunks
        self._inflate = isal_zlib.decompressobj(-15) if deflated else None
        self._pending = b""
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._pending and not self._done:
            chunk = self._chunks.get()
            if not chunk:
                self._done = True
                if self._inflate is not None:
                    self._pending = self._inflate.flush()
            else:
                self._pending = (self._inflate.decompress(chunk) if self._inflate is not None
                                 else chunk)
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


class CellCounter:
    """Counts a CSV's rows per cell as its (deflated) bytes are fed; :meth:`finish` gives the
    counts, or ``None`` when the CSV could not be read (the summary then leaves it out)."""

    def __init__(self, *, deflated: bool, name: str) -> None:
        _use_system_allocator()
        self._queue: queue.Queue[bytes] = queue.Queue(maxsize=_QUEUE_CHUNKS)
        self._name = name
        self._result: Cells | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._count, args=(deflated,), daemon=True,
                                        name=f"cells {name}")
        self._thread.start()

    async def feed(self, chunk: bytes) -> None:
        if chunk and self._thread.is_alive():
            await asyncio.to_thread(self._queue.put, chunk)

    async def finish(self) -> Cells | None:
        if self._thread.is_alive():
            await asyncio.to_thread(self._queue.put, _END)
        await asyncio.to_thread(self._thread.join)
        if self._error is not None:
            log.warning("collection.cells_unreadable", member=self._name, error=repr(self._error))
        return self._result

    def _count(self, deflated: bool) -> None:
        source = _Inflating(self._queue, deflated)
        try:
            reader = pa_csv.open_csv(
                source,
                read_options=pa_csv.ReadOptions(block_size=1 << 20),
                # Quoted values may hold line breaks (street names rarely do, but may).
                parse_options=pa_csv.ParseOptions(newlines_in_values=True),
                convert_options=pa_csv.ConvertOptions(
                    include_columns=["LON", "LAT"],
                    column_types={"LON": pa.float64(), "LAT": pa.float64()}),
            )
            parts: list[Cells] = []
            for batch in reader:
                lon = batch.column(0).to_numpy(zero_copy_only=False)
                lat = batch.column(1).to_numpy(zero_copy_only=False)
                keys, counts = np.unique(cell_keys(lon, lat), return_counts=True)
                parts.append(Cells(keys, counts.astype(np.int64)))
                if len(parts) >= 16:
                    parts = [Cells.merge(parts)]
            self._result = Cells.merge(parts)
        except BaseException as exc:
            self._error = exc
            # Drain what the copy still feeds, so that it never blocks on a full queue.
            while not source.done and self._queue.get():
                pass

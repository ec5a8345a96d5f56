"""Open a downloaded data file by the conform's ``format`` and stream it as Arrow batches.

Every reader yields *raw batches* (see docs/architecture.md, "data contract"): one
``pa.string()`` column per source field, named exactly as in the file, and for OGR formats
one more ``__geometry__`` column (``pa.binary()`` WKB in the file's CRS). Nothing reads a
whole file into memory: CSV goes through ``pyarrow.csv.open_csv`` (``csv_reader.py``),
everything else through ``pyogrio.raw.open_arrow`` (``ogr_reader.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

import pyarrow as pa
import pyproj

from services.worker.conform.csv_reader import CsvReader
from services.worker.conform.ogr_reader import GEOMETRY_COLUMN, OgrReader
from services.worker.errors import RunError

__all__ = ["FORMATS", "GEOMETRY_COLUMN", "Reader", "open_reader"]

#: Conform ``format`` values this module knows; every one but ``csv`` goes through OGR.
FORMATS: frozenset[str] = frozenset(
    {"csv", "geojson", "shapefile", "shapefile-polygon", "gdb", "gpkg", "xml"}
)

DEFAULT_BATCH_ROWS = 65536


@runtime_checkable
class Reader(Protocol):
    """A data file opened for streaming; close it (or use ``with``) when done."""

    fields: list[str]
    crs: pyproj.CRS | None
    geometry_type: str | None

    def batches(self) -> Iterator[pa.RecordBatch]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def open_reader(
    path: Path, conform: Mapping[str, Any], *, batch_rows: int = DEFAULT_BATCH_ROWS
) -> Reader:
    """Open ``path`` as the conform's ``format`` says.

    Raises ``RunError(..., "unknown_format")`` for a format we do not read and
    ``RunError(..., "conform_failed")`` when the file cannot be opened.
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be positive, got {batch_rows}")
    fmt = conform.get("format")
    if fmt not in FORMATS:
        raise RunError(
            f"unknown conform format {fmt!r} for {Path(path).name}; "
            f"expected one of {', '.join(sorted(FORMATS))}",
            "unknown_format",
        )
    path = Path(path)
    if fmt == "csv":
        return CsvReader(path, conform, batch_rows=batch_rows)
    return OgrReader(path, conform, batch_rows=batch_rows)

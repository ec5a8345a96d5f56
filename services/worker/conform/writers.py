"""A run's output files, written from conformed Arrow batches.

* ``out.geojson``: one GeoJSON Feature per line; properties are the layer's attributes (``""``
  when empty, as the reference Machine wrote them) and ``hash``.
* addresses only: ``out.csv`` (the reference column order, CRLF, minimal quoting) and
  ``processed.zip`` holding ``README.txt``, ``{source}.csv`` and ``{source}.vrt`` as the
  reference ``package_output`` laid them out, so existing consumers and collections keep working.
* ``preview.png`` from a bounded sample (see ``preview.py``).

Every text line is assembled column-wise with Arrow string kernels and written as one buffer
per batch: there is no Python loop over rows except for the rare values that need JSON escapes
beyond quotes, backslashes and the common whitespace controls, and for coordinates that are not
on the 7-decimal grid. Nothing proportional to the row count is kept in memory.
"""

from __future__ import annotations

import datetime as dt
import json
import queue
import threading
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import shapely
from isal import isal_zlib

from services.worker.conform.arrays import count_filled, value_bytes
from services.worker.conform.layers import CSV_HEADER, LAYER_ATTRIBUTES
from services.worker.conform.preview import PreviewSample, render_preview
from shared.vrt import vrt_text

GEOJSON_NAME: Final = "out.geojson"
CSV_NAME: Final = "out.csv"
ZIP_NAME: Final = "processed.zip"
PREVIEW_NAME: Final = "preview.png"

_WRITE_BUFFER_BYTES: Final = 1 << 20
# Level 1: deflate at 6 is ~3x slower for ~15% smaller files, and the zip is a legacy format.
# (ISA-L's levels are 0-3; its 1 compresses about as well as zlib's 1, see _use_isal.)
_ZIP_COMPRESSLEVEL: Final = 1
_SINK_QUEUE_BATCHES: Final = 2
_CRLF: Final = "\r\n"
_COORDINATE_DECIMALS: Final = 7
_COORDINATE_GRID: Final = 10**_COORDINATE_DECIMALS
# %.12g switches to exponent notation below 1e-4: such values are formatted by Python.
_PLAIN_NOTATION_MIN: Final = 1e-4
_PLAIN_NOTATION_MAX: Final = 1000.0
_GEOMETRY_TYPE_NAMES: Final = {
    0: "Point",
    1: "LineString",
    2: "LinearRing",
    3: "Polygon",
    4: "MultiPoint",
    5: "MultiLineString",
    6: "MultiPolygon",
    7: "GeometryCollection",
}


@dataclass
class OutputSummary:
    """What a run wrote: counts, extent and the files, for index.json and the run record."""

    feature_count: int
    geometry_type: str | None
    bounds: tuple[float, float, float, float] | None  # minx, miny, maxx, maxy
    attribute_counts: dict[str, int]  # per attribute: features with a non-empty value
    files: dict[str, Path]  # output name -> path


# --- text building blocks (column-wise) ---------------------------------------------------------


def _raw_text(values: pa.Array) -> bytes:
    """A copy of the values' bytes: bytes.__contains__ and translate run at memchr speed, far
    faster here than numpy's isin or a regex kernel over every row."""
    return value_bytes(values).tobytes()


def _contains_any(text: bytes, needles: bytes) -> bool:
    return any(bytes((n,)) in text for n in needles)


_CSV_SPECIAL: Final = b',"\r\n'
_JSON_SHORT_ESCAPES: Final = (
    ("\\", "\\\\"),
    ('"', '\\"'),
    ("\n", "\\n"),
    ("\r", "\\r"),
    ("\t", "\\t"),
)
_JSON_OTHER_CONTROLS: Final = bytes(c for c in range(0x20) if c not in (0x09, 0x0A, 0x0D))
#: Every byte that CSV quoting or JSON escaping acts on.
_TEXT_SPECIAL: Final = bytes(range(0x20)) + b',"\\'


def is_plain_text(raw: bytes) -> bool:
    """Whether values with these bytes are their own CSV field and JSON string body (the
    common case: one pass instead of a check per special byte per file format)."""
    return len(raw.translate(None, _TEXT_SPECIAL)) == len(raw)


def csv_field(values: pa.Array, raw: bytes | None = None) -> pa.Array:
    """Values as CSV fields with minimal quoting (like ``csv.QUOTE_MINIMAL``).

    Nulls stay null: the writer's joins write them as empty fields. ``raw`` is the values'
    bytes when the caller has them already.
    """
    values = values.cast(pa.string())
    if not _contains_any(_raw_text(values) if raw is None else raw, _CSV_SPECIAL):
        return values
    needs_quotes = pc.match_substring_regex(values, '[,"\r\n]')
    quoted = pc.binary_join_element_wise('"', pc.replace_substring(values, '"', '""'), '"', "")
    return pc.if_else(needs_quotes, quoted, values)


def json_string_body(values: pa.Array, raw: bytes | None = None) -> pa.Array:
    """Values escaped for use *inside* JSON double quotes (UTF-8 kept).

    Callers put the quotes into their constant text, which saves a join per column. Nulls stay
    null (the writer's joins write them as empty strings). ``raw`` as for :func:`csv_field`.
    """
    values = values.cast(pa.string())
    text = _raw_text(values) if raw is None else raw
    escaped = values
    # Backslash first, so the escapes added afterwards are not escaped again.
    for needle, replacement in _JSON_SHORT_ESCAPES:
        if needle.encode() in text:
            escaped = pc.replace_substring(escaped, needle, replacement)
    if len(text.translate(None, _JSON_OTHER_CONTROLS)) != len(text):
        # Rare: let json.dumps encode just the rows holding other control characters.
        pattern = "[" + "".join(f"\\x{c:02x}" for c in _JSON_OTHER_CONTROLS) + "]"
        mask = pc.fill_null(pc.match_substring_regex(values, pattern), False)
        rows = pc.filter(values, mask).to_pylist()
        fixed = [json.dumps(v, ensure_ascii=False)[1:-1] for v in rows]
        escaped = pc.replace_with_mask(escaped, mask, pa.array(fixed, type=pa.string()))
    return escaped


def json_string(values: pa.Array) -> pa.Array:
    """Values as JSON string literals; null -> ``""``."""
    return _join('"', json_string_body(values), '"')


def _join(*pieces: pa.Array | str, separator: str = "") -> pa.Array:
    """Row-wise concatenation, a null piece counting as empty text."""
    return pc.binary_join_element_wise(*pieces, separator, null_handling="replace")


def format_coordinates(values: np.ndarray) -> pa.Array:
    """``'%.12g' % v`` for every value, without a per-row Python call.

    On the 7-decimal grid (which the engine guarantees) and for 1e-4 <= |v| < 1000, %.12g
    prints at most 10 significant digits, and then it is exactly the shortest text that reads
    back as the same double: what Arrow's float-to-string cast writes (``5.0`` → ``5``,
    ``-122.4194155`` → ``-122.4194155``). Values off the grid or outside that band (Arrow
    switches to exponents differently below 1e-4), negative zero and non-finite values are
    formatted by Python; a test checks the whole band against ``format(v, ".12g")``.
    """
    values = np.asarray(values, dtype=np.float64)
    magnitude = np.abs(values)
    with np.errstate(invalid="ignore", over="ignore"):
        units = np.rint(magnitude * _COORDINATE_GRID)
        plain = (
            np.isfinite(values)
            & (units / _COORDINATE_GRID == magnitude)
            & (magnitude < _PLAIN_NOTATION_MAX)
            & ((magnitude >= _PLAIN_NOTATION_MIN) | (values == 0))
            & ~((values == 0) & np.signbit(values))
        )
    text = pa.array(values).cast(pa.string())
    if not plain.all():
        odd = ~plain
        fallback = [format(v, ".12g") if np.isfinite(v) else "" for v in values[odd].tolist()]
        text = pc.replace_with_mask(text, pa.array(odd), pa.array(fallback, type=pa.string()))
    return text


def _merge_constants(pieces: list[pa.Array | str]) -> list[pa.Array | str]:
    merged: list[pa.Array | str] = []
    for piece in pieces:
        if isinstance(piece, str) and merged and isinstance(merged[-1], str):
            merged[-1] += piece
        else:
            merged.append(piece)
    return merged


def _concat_bytes(lines: pa.Array) -> pa.Buffer:
    """The contiguous text of a freshly built string array (offset 0), without a copy."""
    end = int(np.frombuffer(lines.buffers()[1], dtype=np.int32)[len(lines)])
    data = lines.buffers()[2]
    return data[:end] if data is not None else pa.py_buffer(b"")


# --- packaging -----------------------------------------------------------------------------------


def archive_base(source_name: str) -> str:
    """Member path stem inside processed.zip, e.g. ``us/ks/lane_county``.

    The reference named members after the source path under ``sources/`` without ``.json``;
    collections merge processed zips as they are, so the directories keep sources apart.
    """
    base = source_name.replace("\\", "/").strip("/")
    base = base.removeprefix("sources/")
    base = base.removesuffix(".json")
    parts = [p for p in base.split("/") if p not in ("", ".", "..")]
    return "/".join(parts) or "source"


_SINGULAR: Final = {
    "addresses": "address",
    "parcels": "parcel",
    "buildings": "building",
    "centerlines": "centerline",
}


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {_describe(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_describe(v) for v in value)
    return str(value)


def readme_text(
    source_name: str, layer: str, members: tuple[str, str], attribution: Mapping[str, Any]
) -> str:
    """README.txt: what the files are, where they came from and under which terms."""
    csv_member, vrt_member = members
    lines = [
        f"OpenAddresses processed data: {source_name} ({layer})",
        f"Packaged on {dt.date.today().isoformat()} by OpenAddresses (https://openaddresses.io).",
        "",
        f"{csv_member}: one row per {_SINGULAR.get(layer, layer)}, UTF-8, "
        "comma separated, with LON/LAT in WGS 84 (EPSG:4326) degrees.",
        f"{vrt_member}: an OGR virtual layer describing that CSV as points, so GDAL/OGR, "
        "QGIS and similar tools open it directly.",
        "",
        "Source terms (as stated by the source file; check the publisher's website):",
    ]
    terms = [
        f"  {str(key).replace('_', ' ').capitalize()}: {_describe(value)}"
        for key, value in attribution.items()
    ]
    lines += terms or ["  Unknown: the source states no license."]
    return "\n".join(lines) + "\n"


class _BackgroundSink:
    """Writes buffers, in order, to one or more binary streams on its own thread.

    File writes and deflate release the GIL, so with this the disk and the zip compression run
    alongside the Arrow kernels of the next batch. The queue is short, so memory stays flat.
    """

    def __init__(self, name: str, targets: list[IO[bytes]]) -> None:
        self._targets = targets
        self._queue: queue.Queue[pa.Buffer | bytes | None] = queue.Queue(_SINK_QUEUE_BATCHES)
        self._error: BaseException | None = None
        self._finished = False
        self._thread = threading.Thread(target=self._run, name=f"sink-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining so the producer never blocks on a dead sink
            try:
                view = memoryview(data)
                for target in self._targets:
                    target.write(view)
            except BaseException as exc:  # handed over to the producer thread
                self._error = exc

    def write(self, data: pa.Buffer | bytes) -> None:
        self._raise_if_failed()
        self._queue.put(data)

    def finish(self) -> None:
        """Queue the end of the stream, without waiting for the writes before it."""
        if not self._finished:
            self._finished = True
            self._queue.put(None)

    def close(self) -> None:
        """Flush everything queued and stop; re-raise a write error in the caller's thread."""
        if self._thread.is_alive():
            self.finish()
            self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise OSError(f"writing output failed: {self._error}") from self._error


def _use_isal(member: IO[bytes]) -> None:
    """Deflate a zip member with ISA-L instead of zlib: the same format (any unzip reads it),
    ~4x faster and slightly smaller at level 1 (1.7 s → 0.4 s for a 92 MB CSV), which was the
    largest CPU cost of writing an address run.

    zipfile has no hook for its compressor; the member's ``_compressor`` (CPython's
    ``_ZipWriteFile``, a ``zlib.compressobj(level, DEFLATED, -15)``) is replaced before any
    byte is written. Where that attribute is missing, zlib stays: slower, equally correct.
    """
    compressor = getattr(member, "_compressor", None)
    if compressor is not None:
        member._compressor = isal_zlib.compressobj(  # type: ignore[attr-defined]
            _ZIP_COMPRESSLEVEL, isal_zlib.DEFLATED, -isal_zlib.MAX_WBITS
        )


def _member(name: str, stamp: tuple[int, int, int, int, int, int]) -> zipfile.ZipInfo:
    """A deflated member dated ``stamp`` (UTC: a zip's dates carry no zone)."""
    info = zipfile.ZipInfo(name, date_time=stamp)
    info.compress_type = zipfile.ZIP_DEFLATED
    info._compresslevel = _ZIP_COMPRESSLEVEL  # type: ignore[attr-defined]  # what writestr sets
    info.external_attr = 0o644 << 16  # rw-r--r--: readable by everyone once unzipped
    return info


class _ProcessedZip:
    """processed.zip, its CSV member written as the CSV is produced (never read back)."""

    def __init__(
        self, path: Path, source_name: str, layer: str, attribution: Mapping[str, Any]
    ) -> None:
        base = archive_base(source_name)
        csv_member, vrt_member = f"{base}.csv", f"{base}.vrt"
        self.path = path
        self._archive = zipfile.ZipFile(
            path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=_ZIP_COMPRESSLEVEL
        )
        # Every member is dated when the run wrote it: zipfile would date a member opened for
        # streaming 1980-01-01 (and the others in local time).
        stamp = dt.datetime.now(dt.UTC).timetuple()[:6]
        readme = readme_text(source_name, layer, (csv_member, vrt_member), attribution)
        self._archive.writestr(_member("README.txt", stamp), readme)
        self._archive.writestr(_member(vrt_member, stamp), vrt_text(csv_member))
        # force_zip64: the size is unknown up front and may pass 4 GiB.
        self.csv_stream: IO[bytes] = self._archive.open(
            _member(csv_member, stamp), "w", force_zip64=True
        )
        _use_isal(self.csv_stream)

    def close(self) -> None:
        self.csv_stream.close()
        self._archive.close()

    def discard(self) -> None:
        try:
            self.close()
        finally:
            self.path.unlink(missing_ok=True)


# --- the writer ----------------------------------------------------------------------------------


@dataclass
class _Stats:
    feature_count: int = 0
    bounds: list[float] = field(default_factory=lambda: [np.inf, np.inf, -np.inf, -np.inf])
    attribute_counts: dict[str, int] = field(default_factory=dict)
    geometry_types: set[int] = field(default_factory=set)

    def add_bounds(self, minx: float, miny: float, maxx: float, maxy: float) -> None:
        b = self.bounds
        self.bounds = [min(b[0], minx), min(b[1], miny), max(b[2], maxx), max(b[3], maxy)]

    def geometry_type(self, layer: str) -> str | None:
        if not self.feature_count:
            return None
        if layer == "addresses":
            return "Point"
        names = {_GEOMETRY_TYPE_NAMES.get(t, "Unknown") for t in self.geometry_types}
        if len(names) == 1:
            return names.pop()
        # Polygons mixed with MultiPolygons (and so on) are multi-geometries of that kind.
        singles = {n.removeprefix("Multi") for n in names}
        return f"Multi{singles.pop()}" if len(singles) == 1 else "GeometryCollection"

    def final_bounds(self) -> tuple[float, float, float, float] | None:
        if not np.isfinite(self.bounds).all():
            return None
        minx, miny, maxx, maxy = (float(v) for v in self.bounds)
        return minx, miny, maxx, maxy


class OutputWriter:
    """Writes a run's outputs batch by batch; use as a context manager and call :meth:`close`.

    ``attribution`` is the source's license/attribution information (e.g. ``website``,
    ``license``, ``attribution``, ``share-alike``) reproduced in the zip's README.txt.
    """

    def __init__(
        self, outdir: Path, layer: str, *, source_name: str, attribution: Mapping[str, Any]
    ) -> None:
        if layer not in LAYER_ATTRIBUTES:
            raise ValueError(f"unknown layer {layer!r}")
        self._outdir = Path(outdir)
        self._outdir.mkdir(parents=True, exist_ok=True)
        self._layer = layer
        self._source_name = source_name
        self._attribution = dict(attribution)
        self._attributes = LAYER_ATTRIBUTES[layer]
        self._is_addresses = layer == "addresses"
        self._stats = _Stats(attribute_counts=dict.fromkeys(self._attributes, 0))
        self._sample = PreviewSample()
        self._closed = False
        self._files: list[IO[bytes]] = []
        self._zip: _ProcessedZip | None = None
        self._geojson = self._open_sink(GEOJSON_NAME, [])
        self._csv: _BackgroundSink | None = None
        if self._is_addresses:
            self._zip = _ProcessedZip(
                self._outdir / ZIP_NAME, source_name, layer, self._attribution
            )
            self._csv = self._open_sink(CSV_NAME, [self._zip.csv_stream])
            self._csv.write((",".join(CSV_HEADER) + _CRLF).encode())
        # The constant JSON around each property value, built once.
        keys = [*self._attributes, "hash"]
        self._property_prefixes = [
            ('{"type":"Feature","properties":{' if i == 0 else '",') + json.dumps(k) + ':"'
            for i, k in enumerate(keys)
        ]

    def _open_sink(self, name: str, extra: list[IO[bytes]]) -> _BackgroundSink:
        handle = open(self._outdir / name, "wb", buffering=_WRITE_BUFFER_BYTES)
        self._files.append(handle)
        return _BackgroundSink(name, [handle, *extra])

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and not self._closed:
            self.abort()
        elif not self._closed:
            self.close()

    # -- per batch

    def write(self, batch: pa.RecordBatch) -> None:
        if self._closed:
            raise RuntimeError("OutputWriter is closed")
        if batch.num_rows == 0:
            return
        columns = {name: self._column(batch, name) for name in (*self._attributes, "hash")}
        filled = self._count_attributes(columns)
        empty = {name for name, count in filled.items() if count == 0}
        # Each column's bytes are scanned once for what CSV quoting or JSON escaping act on;
        # plain columns (nearly all) go into both files as they are.
        raw = {name: _raw_text(values) for name, values in columns.items() if name not in empty}
        plain = {name for name, text in raw.items() if is_plain_text(text)}
        if self._is_addresses:
            lon = self._floats(batch, "lon")
            lat = self._floats(batch, "lat")
            # "lon,lat" serves both files: the CSV's first two fields and the GeoJSON point.
            lon_lat = _join(format_coordinates(lon), format_coordinates(lat), separator=",")
            geometry: list[pa.Array | str] = ['{"type":"Point","coordinates":[', lon_lat, "]}"]
            self._track_points(lon, lat)
            self._write_csv(
                {name: columns[name] if name in plain or name in empty
                 else csv_field(columns[name], raw[name]) for name in columns},
                lon_lat,
            )
        else:
            geometry = [self._track_shapes(batch)]
        self._write_geojson(
            {name: columns[name] if name in plain else json_string_body(columns[name], raw[name])
             for name in columns if name not in empty},
            empty,
            geometry,
        )
        self._stats.feature_count += batch.num_rows

    @staticmethod
    def _column(batch: pa.RecordBatch, name: str) -> pa.Array:
        index = batch.schema.get_field_index(name)
        if index < 0:
            return pa.nulls(batch.num_rows, type=pa.string())
        return batch.column(index).cast(pa.string())

    @staticmethod
    def _floats(batch: pa.RecordBatch, name: str) -> np.ndarray:
        column = batch.column(batch.schema.get_field_index(name)).cast(pa.float64())
        return column.to_numpy(zero_copy_only=False)

    def _count_attributes(self, columns: Mapping[str, pa.Array]) -> dict[str, int]:
        """Add this batch's filled counts to the totals and return them."""
        filled: dict[str, int] = {}
        for name in self._attributes:
            count = count_filled(columns[name])
            filled[name] = count
            self._stats.attribute_counts[name] += count
        return filled

    def _track_points(self, lon: np.ndarray, lat: np.ndarray) -> None:
        finite = np.isfinite(lon) & np.isfinite(lat)
        if finite.any():
            self._stats.add_bounds(
                float(lon[finite].min()),
                float(lat[finite].min()),
                float(lon[finite].max()),
                float(lat[finite].max()),
            )
        self._sample.add_points(lon, lat)

    def _track_shapes(self, batch: pa.RecordBatch) -> pa.Array:
        """Stats and sample for WKB geometries; returns their GeoJSON text (``null`` if none)."""
        index = batch.schema.get_field_index("__geometry__")
        wkb = (
            batch.column(index).to_numpy(zero_copy_only=False)
            if index >= 0
            else np.full(batch.num_rows, None)
        )
        geometries = shapely.from_wkb(wkb)
        present = ~shapely.is_missing(geometries)
        if present.any():
            with np.errstate(invalid="ignore"):
                bounds = shapely.bounds(geometries[present])
            if np.isfinite(bounds).any():
                self._stats.add_bounds(
                    float(np.nanmin(bounds[:, 0])),
                    float(np.nanmin(bounds[:, 1])),
                    float(np.nanmax(bounds[:, 2])),
                    float(np.nanmax(bounds[:, 3])),
                )
            self._stats.geometry_types.update(
                np.unique(shapely.get_type_id(geometries[present])).tolist()
            )
            self._sample.add_geometries(geometries[present])
        text = shapely.to_geojson(geometries)
        return pc.fill_null(pa.array(text, type=pa.string()), "null")

    def _write_geojson(
        self, bodies: Mapping[str, pa.Array], empty: set[str], geometry: list[pa.Array | str]
    ) -> None:
        """``bodies``: each non-empty column escaped for use inside JSON quotes."""
        pieces: list[pa.Array | str] = []
        for prefix, name in zip(self._property_prefixes, (*self._attributes, "hash"), strict=True):
            pieces.append(prefix)
            if name not in empty:  # an all-empty column is just its constant text
                pieces.append(bodies[name])
        pieces += ['"},"geometry":', *geometry, "}\n"]
        # Each argument costs a pass over the rows, so adjacent constants are merged first.
        self._geojson.write(_concat_bytes(_join(*_merge_constants(pieces))))

    def _write_csv(self, fields: Mapping[str, pa.Array], lon_lat: pa.Array) -> None:
        """``fields``: each column as CSV fields (quoted where needed)."""
        assert self._csv is not None
        # The line end rides on the last field, so the joined values are the file's bytes.
        last = _join(fields["hash"], _CRLF)
        line = [lon_lat, *(fields[name.lower()] for name in CSV_HEADER[2:-1]), last]
        self._csv.write(_concat_bytes(_join(*line, separator=",")))

    # -- at the end

    def close(self) -> OutputSummary:
        """Finish the files and the zip, draw preview.png, and return the summary."""
        if self._closed:
            raise RuntimeError("OutputWriter is already closed")
        self._closed = True
        files: dict[str, Path] = {GEOJSON_NAME: self._outdir / GEOJSON_NAME}
        if self._zip is not None:
            files[CSV_NAME] = self._outdir / CSV_NAME
            files[ZIP_NAME] = self._zip.path
        try:
            # The preview is drawn while the sinks write (and deflate) their last batches.
            for sink in (self._geojson, self._csv):
                if sink is not None:
                    sink.finish()
            if len(self._sample):
                files[PREVIEW_NAME] = self._outdir / PREVIEW_NAME
                render_preview(self._sample, files[PREVIEW_NAME])
            self._finish_streams()
        except BaseException:
            self.abort()
            raise
        return OutputSummary(
            feature_count=self._stats.feature_count,
            geometry_type=self._stats.geometry_type(self._layer),
            bounds=self._stats.final_bounds(),
            attribute_counts=dict(self._stats.attribute_counts),
            files=files,
        )

    def abort(self) -> None:
        """Stop after a failure: release threads and handles and delete the partial zip."""
        self._closed = True
        for sink in (self._geojson, self._csv):
            if sink is not None:
                try:
                    sink.close()
                except OSError:
                    pass  # the original failure matters more than a second one
        for handle in self._files:
            handle.close()
        if self._zip is not None:
            self._zip.discard()
            self._zip = None

    def _finish_streams(self) -> None:
        self._geojson.close()
        if self._csv is not None:
            self._csv.close()
        for handle in self._files:
            handle.close()
        if self._zip is not None:
            self._zip.close()

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
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import shapely

from services.worker.conform.layers import CSV_HEADER, LAYER_ATTRIBUTES
from services.worker.conform.preview import PreviewSample, render_preview

GEOJSON_NAME: Final = "out.geojson"
CSV_NAME: Final = "out.csv"
ZIP_NAME: Final = "processed.zip"
PREVIEW_NAME: Final = "preview.png"

_WRITE_BUFFER_BYTES: Final = 1 << 20
_ZIP_COMPRESSLEVEL: Final = 6
_CRLF: Final = "\r\n"
_COORDINATE_DECIMALS: Final = 7
_COORDINATE_GRID: Final = 10**_COORDINATE_DECIMALS
# %.12g switches to exponent notation below 1e-4 and above 1e12; outside that band (and for
# values off the 7-decimal grid) we let Python format the few values concerned.
_PLAIN_NOTATION_MIN: Final = 1e-4
_PLAIN_NOTATION_MAX: Final = 1e11
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


def _data_bytes(values: pa.Array) -> np.ndarray:
    """The bytes of a string array's values, as a zero-copy uint8 view."""
    data = values.buffers()[2]
    if data is None or len(values) == 0:
        return np.empty(0, dtype=np.uint8)
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int32)
    start, end = int(offsets[values.offset]), int(offsets[values.offset + len(values)])
    return np.frombuffer(data, dtype=np.uint8)[start:end]


def _has_any_byte(raw: np.ndarray, wanted: bytes) -> bool:
    return bool(np.isin(raw, np.frombuffer(wanted, dtype=np.uint8)).any())


_CSV_SPECIAL: Final = b',"\r\n'
_JSON_SHORT_ESCAPES: Final = (
    ("\\", "\\\\"),
    ('"', '\\"'),
    ("\n", "\\n"),
    ("\r", "\\r"),
    ("\t", "\\t"),
)
_JSON_OTHER_CONTROLS: Final = bytes(c for c in range(0x20) if c not in (0x09, 0x0A, 0x0D))


def csv_field(values: pa.Array) -> pa.Array:
    """Values as CSV fields with minimal quoting (like ``csv.QUOTE_MINIMAL``); null -> empty."""
    values = pc.fill_null(values.cast(pa.string()), "")
    if not _has_any_byte(_data_bytes(values), _CSV_SPECIAL):
        return values
    needs_quotes = pc.match_substring_regex(values, '[,"\r\n]')
    quoted = pc.binary_join_element_wise('"', pc.replace_substring(values, '"', '""'), '"', "")
    return pc.if_else(needs_quotes, quoted, values)


def json_string(values: pa.Array) -> pa.Array:
    """Values as JSON string literals (UTF-8, not \\u-escaped); null -> ``""``."""
    values = pc.fill_null(values.cast(pa.string()), "")
    raw = _data_bytes(values)
    escaped = values
    if _has_any_byte(raw, b'"\\\n\r\t'):
        for needle, replacement in _JSON_SHORT_ESCAPES:
            escaped = pc.replace_substring(escaped, needle, replacement)
    literals = pc.binary_join_element_wise('"', escaped, '"', "")
    if _has_any_byte(raw, _JSON_OTHER_CONTROLS):
        # Rare: let json.dumps encode just the rows holding other control characters.
        pattern = "[" + "".join(f"\\x{c:02x}" for c in _JSON_OTHER_CONTROLS) + "]"
        mask = pc.match_substring_regex(values, pattern)
        fixed = [json.dumps(v, ensure_ascii=False) for v in pc.filter(values, mask).to_pylist()]
        literals = pc.replace_with_mask(literals, mask, pa.array(fixed, type=pa.string()))
    return literals


def format_coordinates(values: np.ndarray) -> pa.Array:
    """``'%.12g' % v`` for every value, column-wise.

    On the 7-decimal grid (which the engine guarantees) %.12g prints exactly the integer part,
    a point and the fraction digits without trailing zeros, so integer arithmetic builds the
    same text with no per-row formatting. The few values off the grid, outside the band where
    %.12g uses plain notation, negative zero or not finite are formatted by Python.
    """
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        units = np.rint(np.abs(values) * _COORDINATE_GRID)
        magnitude = np.abs(values)
        on_grid = (
            np.isfinite(values)
            & (units / _COORDINATE_GRID == magnitude)
            & (magnitude < _PLAIN_NOTATION_MAX)
            & ((magnitude >= _PLAIN_NOTATION_MIN) | (values == 0))
            & ~((values == 0) & np.signbit(values))
        )
    units = np.where(on_grid, units, 0).astype(np.int64)
    whole = pa.array(units // _COORDINATE_GRID).cast(pa.string())
    fraction = pc.utf8_rtrim(
        pc.utf8_lpad(
            pa.array(units % _COORDINATE_GRID).cast(pa.string()), _COORDINATE_DECIMALS, "0"
        ),
        "0",
    )
    point = pc.if_else(pc.greater(pc.utf8_length(fraction), 0), ".", "")
    sign = pa.array(np.where(values < 0, "-", ""), type=pa.string())
    text = pc.binary_join_element_wise(sign, whole, point, fraction, "")
    if not on_grid.all():
        off_grid = ~on_grid
        fallback = [format(v, ".12g") if np.isfinite(v) else "" for v in values[off_grid].tolist()]
        text = pc.replace_with_mask(text, pa.array(off_grid), pa.array(fallback, type=pa.string()))
    return text


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


def vrt_text(csv_member: str) -> str:
    """An OGR VRT reading the sibling CSV as EPSG:4326 points from LON/LAT."""
    csv_file = csv_member.rsplit("/", 1)[-1]
    layer = csv_file.removesuffix(".csv")
    return (
        "<OGRVRTDataSource>\n"
        f"  <OGRVRTLayer name={quoteattr(layer)}>\n"
        f'    <SrcDataSource relativeToVRT="1">{escape(csv_file)}</SrcDataSource>\n'
        f"    <SrcLayer>{escape(layer)}</SrcLayer>\n"
        "    <GeometryType>wkbPoint</GeometryType>\n"
        "    <LayerSRS>EPSG:4326</LayerSRS>\n"
        '    <GeometryField encoding="PointFromColumns" x="LON" y="LAT"/>\n'
        "  </OGRVRTLayer>\n"
        "</OGRVRTDataSource>\n"
    )


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
        self._attributes = LAYER_ATTRIBUTES[layer]  # type: ignore[index]
        self._is_addresses = layer == "addresses"
        self._stats = _Stats(attribute_counts=dict.fromkeys(self._attributes, 0))
        self._sample = PreviewSample()
        self._closed = False
        self._geojson: IO[bytes] = open(
            self._outdir / GEOJSON_NAME, "wb", buffering=_WRITE_BUFFER_BYTES
        )
        self._csv: IO[bytes] | None = None
        if self._is_addresses:
            self._csv = open(self._outdir / CSV_NAME, "wb", buffering=_WRITE_BUFFER_BYTES)
            self._csv.write((",".join(CSV_HEADER) + _CRLF).encode())
        # The constant JSON around each property value, built once.
        keys = [*self._attributes, "hash"]
        self._property_prefixes = [
            ('{"type":"Feature","properties":{' if i == 0 else ",") + json.dumps(k) + ":"
            for i, k in enumerate(keys)
        ]

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._close_files()  # leave no open handles; a failed run publishes nothing
        elif not self._closed:
            self.close()

    # -- per batch

    def write(self, batch: pa.RecordBatch) -> None:
        if self._closed:
            raise RuntimeError("OutputWriter is closed")
        if batch.num_rows == 0:
            return
        columns = {name: self._column(batch, name) for name in (*self._attributes, "hash")}
        self._count_attributes(columns)
        if self._is_addresses:
            lon = self._floats(batch, "lon")
            lat = self._floats(batch, "lat")
            lon_text, lat_text = format_coordinates(lon), format_coordinates(lat)
            geometry_json = pc.binary_join_element_wise(
                '{"type":"Point","coordinates":[', lon_text, ",", lat_text, "]}", ""
            )
            self._track_points(lon, lat)
            self._write_csv(columns, lon_text, lat_text)
        else:
            geometry_json = self._track_shapes(batch)
        self._write_geojson(columns, geometry_json)
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

    def _count_attributes(self, columns: Mapping[str, pa.Array]) -> None:
        for name in self._attributes:
            filled = pc.sum(pc.greater(pc.binary_length(columns[name]), 0)).as_py() or 0
            self._stats.attribute_counts[name] += int(filled)

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

    def _write_geojson(self, columns: Mapping[str, pa.Array], geometry_json: pa.Array) -> None:
        parts: list[pa.Array | str] = []
        for prefix, name in zip(self._property_prefixes, (*self._attributes, "hash"), strict=True):
            parts += [prefix, json_string(columns[name])]
        parts += ['},"geometry":', geometry_json, "}\n"]
        lines = pc.binary_join_element_wise(*parts, "")
        self._geojson.write(_concat_bytes(lines))

    def _write_csv(
        self, columns: Mapping[str, pa.Array], lon_text: pa.Array, lat_text: pa.Array
    ) -> None:
        assert self._csv is not None
        fields = [lon_text, lat_text]
        fields += [csv_field(columns[name.lower()]) for name in CSV_HEADER[2:-1]]
        # The line end rides on the last field, so the joined values are the file's bytes.
        fields.append(pc.binary_join_element_wise(csv_field(columns["hash"]), _CRLF, ""))
        self._csv.write(_concat_bytes(pc.binary_join_element_wise(*fields, ",")))

    # -- at the end

    def close(self) -> OutputSummary:
        """Finish the files, build processed.zip and preview.png, and return the summary."""
        if self._closed:
            raise RuntimeError("OutputWriter is already closed")
        self._close_files()
        files: dict[str, Path] = {GEOJSON_NAME: self._outdir / GEOJSON_NAME}
        if self._is_addresses:
            files[CSV_NAME] = self._outdir / CSV_NAME
            files[ZIP_NAME] = self._package(files[CSV_NAME])
        if len(self._sample):
            files[PREVIEW_NAME] = self._outdir / PREVIEW_NAME
            render_preview(self._sample, files[PREVIEW_NAME])
        return OutputSummary(
            feature_count=self._stats.feature_count,
            geometry_type=self._stats.geometry_type(self._layer),
            bounds=self._stats.final_bounds(),
            attribute_counts=dict(self._stats.attribute_counts),
            files=files,
        )

    def _close_files(self) -> None:
        self._closed = True
        for handle in (self._geojson, self._csv):
            if handle is not None and not handle.closed:
                handle.close()

    def _package(self, csv_path: Path) -> Path:
        base = archive_base(self._source_name)
        csv_member, vrt_member = f"{base}.csv", f"{base}.vrt"
        zip_path = self._outdir / ZIP_NAME
        readme = readme_text(
            self._source_name, self._layer, (csv_member, vrt_member), self._attribution
        )
        with zipfile.ZipFile(
            zip_path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=_ZIP_COMPRESSLEVEL
        ) as archive:
            archive.writestr("README.txt", readme)
            archive.writestr(vrt_member, vrt_text(csv_member))
            # ZipFile.write copies the file in chunks: the CSV is never held in memory.
            archive.write(csv_path, csv_member)
        return zip_path

"""Stream any OGR-readable file (shapefile, GeoJSON, GeoJSON lines, FileGDB, GPKG, GML) as raw
Arrow batches through ``pyogrio.raw.open_arrow``.

Typed OGR values become text the way the reference Machine wrote them (Python ``str`` of what
OGR returned): integers ``"12"``, reals ``"12.0"`` / ``"12.5"`` (cleaning strips a trailing
``.0`` later), booleans ``"1"`` / ``"0"``. Where the reference printed OGR's own
``YYYY/MM/DD`` dates we write ISO 8601 (``2024-01-31``, ``2024-01-31T10:00:00``), and list
fields become JSON arrays.
"""

from __future__ import annotations

import contextlib
import functools
import json
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyproj
import structlog

from services.worker.conform.curves import linearize
from services.worker.errors import RunError

# pyogrio (GDAL and its own PROJ) is imported on first use: it adds ~50 MiB of RSS and
# 0.1 s to every run's start-up, and CSV runs never need it.

log = structlog.get_logger(__name__)

GEOMETRY_COLUMN = "__geometry__"

#: Formats stored as shapefiles: the only OGR driver where a conform ``encoding`` means
#: something (the others are UTF-8 or declare their encoding), and the only one where
#: pyogrio accepts an encoding together with Arrow.
_SHAPEFILE_FORMATS = frozenset({"shapefile", "shapefile-polygon"})

#: ``str(float)`` switches to exponent notation from 1e16; below it an integral float is
#: printed as its integer followed by ``.0``, which Arrow can build without a Python loop.
_PLAIN_FLOAT_LIMIT = 1e16
#: Between these magnitudes Arrow's float-to-text cast prints fractional values exactly as
#: ``str(float)`` does (checked on random values); outside it uses exponents differently.
_ARROW_AGREES_FROM = 1e-3
_ARROW_AGREES_BELOW = 1e9

@functools.cache
def _ogr_errors() -> tuple[type[Exception], ...]:
    """What OGR and Arrow raise for a file they cannot read."""
    import pyogrio.errors

    return (
        pyogrio.errors.DataSourceError,
        pyogrio.errors.DataLayerError,
        pyogrio.errors.FieldError,
        pyogrio.errors.GeometryError,
        pyogrio.errors.CRSError,
        pa.ArrowException,
        OSError,
        ValueError,
    )


def _layer_arg(conform: Mapping[str, Any]) -> int | str | None:
    layer = conform.get("layer")
    if layer is None or isinstance(layer, int):
        return layer
    text = str(layer)
    # Source JSON sometimes writes an index as a string ("0").
    return int(text) if text.isdigit() else text


def _layer_names(path: Path) -> list[str]:
    import pyogrio

    try:
        return [str(name) for name in pyogrio.list_layers(str(path))[:, 0]]
    except _ogr_errors():
        return []


def _declared_count(path: Path, layer: int | str | None) -> int:
    import pyogrio

    try:
        with warnings.catch_warnings():
            # The same multi-layer warning as when opening: layer 0 is the documented default.
            warnings.simplefilter("ignore", UserWarning)
            info = pyogrio.read_info(str(path), layer=layer, force_feature_count=False)
    except _ogr_errors():
        return -1
    return int(info.get("features", -1))


def _parse_crs(text: str | None, path: Path) -> pyproj.CRS | None:
    if not text:
        return None
    try:
        return pyproj.CRS.from_user_input(text)
    except pyproj.exceptions.CRSError:
        log.warning("ogr.crs_unreadable", file=path.name, crs=text[:200])
        return None


class OgrReader:
    """One layer of an OGR data source, opened for streaming."""

    def __init__(self, path: Path, conform: Mapping[str, Any], *, batch_rows: int) -> None:
        import pyogrio
        from pyogrio.raw import open_arrow

        # Shapefiles published without their .shx index are common; GDAL can rebuild it.
        pyogrio.set_gdal_config_options({"SHAPE_RESTORE_SHX": "YES"})

        self.path = path
        self._stack = contextlib.ExitStack()
        layer = _layer_arg(conform)
        encoding = conform.get("encoding") if conform.get("format") in _SHAPEFILE_FORMATS else None
        try:
            with warnings.catch_warnings():
                # pyogrio warns when a multi-layer file is opened without a layer; layer 0 is
                # what the reference used too.
                warnings.simplefilter("ignore", UserWarning)
                meta, stream = self._stack.enter_context(
                    open_arrow(
                        str(path),
                        layer=layer,
                        encoding=encoding or None,
                        batch_size=batch_rows,
                        use_pyarrow=True,
                        datetime_as_string=True,
                    )
                )
        except _ogr_errors() as exc:
            self._stack.close()
            raise self._open_error(layer, exc) from exc
        self._stream: pa.RecordBatchReader = stream
        self.fields: list[str] = [str(name) for name in meta["fields"]]
        self.crs: pyproj.CRS | None = _parse_crs(meta.get("crs"), path)
        self.geometry_type: str | None = meta.get("geometry_type")
        self._schema = pa.schema(
            [pa.field(name, pa.string()) for name in self.fields]
            + [pa.field(GEOMETRY_COLUMN, pa.binary())]
        )
        #: What the layer says it holds (-1 when the driver can't tell without a full scan).
        self.declared_count = _declared_count(path, layer)

    def _open_error(self, layer: int | str | None, exc: Exception) -> RunError:
        message = f"cannot open {self.path.name}"
        if layer is not None:
            message += f" layer {layer!r} (layers: {', '.join(_layer_names(self.path)) or 'none'})"
        return RunError(f"{message}: {exc}", "conform_failed")

    def batches(self) -> Iterator[pa.RecordBatch]:
        """Yield batches of strings plus ``__geometry__`` WKB, in file order (one pass only)."""
        features_read = 0
        while True:
            try:
                batch = self._stream.read_next_batch()
            except StopIteration:
                self._check_complete(features_read)
                return
            except _ogr_errors() as exc:
                raise RunError(
                    f"cannot read {self.path.name} after feature {features_read}: {exc}",
                    "conform_failed",
                ) from exc
            features_read += batch.num_rows
            yield self._raw_batch(batch)

    def _check_complete(self, features_read: int) -> None:
        # GDAL stops quietly at the end of a truncated .dbf; losing rows without a word is
        # worse than failing the run.
        if 0 <= features_read < self.declared_count:
            raise RunError(
                f"{self.path.name} declares {self.declared_count} features but only "
                f"{features_read} could be read: the file looks truncated",
                "conform_failed",
            )

    def _raw_batch(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        # Fields come first and in layer order; whatever column is left is the geometry
        # (its name depends on the driver: wkb_geometry, geom, SHAPE, ...).
        columns = [to_strings(batch.column(i)) for i in range(len(self.fields))]
        if batch.num_columns > len(self.fields):
            # Arcs (FileGDB, GeoPackage) become lines here, before anything needs GEOS.
            geometry = linearize(_as_binary(batch.column(len(self.fields))))
        else:
            geometry = pa.nulls(batch.num_rows, pa.binary())
        return pa.RecordBatch.from_arrays([*columns, geometry], schema=self._schema)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _as_binary(column: pa.Array) -> pa.Array:
    if isinstance(column, pa.ExtensionArray):
        column = column.storage
    return column if column.type == pa.binary() else column.cast(pa.binary())


def to_strings(column: pa.Array) -> pa.Array:
    """One OGR field's values as text (see the module docstring), nulls kept."""
    kind = column.type
    if pa.types.is_string(kind):
        return _valid_utf8(column)
    if pa.types.is_boolean(kind):
        return pc.if_else(column, "1", "0")
    if pa.types.is_floating(kind):
        return _floats_to_strings(column)
    if pa.types.is_timestamp(kind):
        return pc.strftime(column, format="%Y-%m-%dT%H:%M:%S")
    if (
        pa.types.is_integer(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_date(kind)
        or pa.types.is_time(kind)
        or pa.types.is_null(kind)
    ):
        return column.cast(pa.string())
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return pa.array([None if v is None else v.hex() for v in column.to_pylist()], pa.string())
    # Lists and anything rarer: JSON text keeps the structure readable.
    return pa.array(
        [
            None if v is None else json.dumps(v, ensure_ascii=False, default=str)
            for v in column.to_pylist()
        ],
        pa.string(),
    )


def _valid_utf8(column: pa.Array) -> pa.Array:
    """``column`` with every value valid UTF-8.

    GDAL recodes a shapefile's dbf to UTF-8 only when it knows the code page (a ``.cpg``, the
    dbf header, or the conform's ``encoding``); without one its Arrow stream passes the raw
    bytes on in a string column, and the first ``as_py()`` fails. Such a dbf is ISO-8859-1,
    the format's default and what GDAL itself reports for the layer, unless it happens to be
    valid UTF-8, which many newer tools write without saying so: so values that are valid
    UTF-8 stay, the others are read as ISO-8859-1 (which decodes any byte).
    """
    try:
        column.validate(full=True)
        return column
    except pa.ArrowInvalid:
        pass
    raw = column.view(pa.binary()).to_pylist()
    return pa.array([None if value is None else _decode(value) for value in raw], pa.string())


def _decode(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("iso-8859-1")


def _floats_to_strings(column: pa.Array) -> pa.Array:
    """Reals as Python's ``str(float)`` prints them: ``12.0``, ``12.5``, ``1e+16``.

    Three vectorised cases cover nearly every value; a Python loop handles the rest:
    integral values (integer text plus ``.0``), fractional values in
    [``_ARROW_AGREES_FROM``, ``_ARROW_AGREES_BELOW``) where Arrow's shortest round-trip text
    is character for character Python's, and float32 columns, which Arrow prints as the
    shortest float32 text (Python would print the float64 noise, 12.300000190734863).
    """
    values = column.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls become NaN
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    magnitude = np.abs(values)
    integral = np.isfinite(values) & (magnitude < _PLAIN_FLOAT_LIMIT)
    integral[integral] = np.floor(values[integral]) == values[integral]
    whole = pa.array(np.where(integral, values, 0).astype(np.int64)).cast(pa.string())
    text = pc.if_else(
        pa.array(integral),
        pc.binary_join_element_wise(whole, ".0", ""),
        column.cast(pa.string()),
    )
    if not pa.types.is_float32(column.type):
        with np.errstate(invalid="ignore"):
            arrow_agrees = (magnitude >= _ARROW_AGREES_FROM) & (magnitude < _ARROW_AGREES_BELOW)
        others = np.flatnonzero(valid & ~integral & ~arrow_agrees)
        if others.size:
            merged = np.asarray(text.to_numpy(zero_copy_only=False), dtype=object)
            merged[others] = [str(v) for v in values[others].tolist()]
            text = pa.array(merged, pa.string())
    if column.null_count:
        text = pc.if_else(column.is_valid(), text, pa.scalar(None, pa.string()))
    return text

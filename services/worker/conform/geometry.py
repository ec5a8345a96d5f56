"""Coordinate reference systems, reprojection to EPSG:4326 and the one point of an address.

Axis order is always x = longitude / easting, y = latitude / northing (``always_xy=True``):
EPSG:4326 officially puts latitude first, and a transformer built without ``always_xy``
silently swaps every reprojected source.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyproj
import shapely
from shapely.errors import GEOSException

from services.worker.errors import ConformError

WGS84 = pyproj.CRS.from_epsg(4326)
#: Output precision: 7 decimals of a degree is about 1 cm, as the reference rounds.
COORDINATE_DECIMALS = 7

_SRS_PATTERN = re.compile(r"^\s*EPSG:(\d+)\s*$", re.IGNORECASE)
# What Python's float() would accept after trimming, so unparsable text becomes NaN
# instead of failing Arrow's cast for the whole batch.
_FLOAT_PATTERN = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"


def source_crs(conform: Mapping[str, Any], file_crs: pyproj.CRS | None) -> pyproj.CRS:
    """The CRS the source's coordinates are in.

    A conform ``srs`` (``"EPSG:2227"``) overrides whatever the file says, because sources set
    it precisely when the file is missing or wrong; without either we assume EPSG:4326.
    """
    srs = conform.get("srs")
    if srs is None:
        return file_crs if file_crs is not None else WGS84
    match = _SRS_PATTERN.match(str(srs))
    if match is None:
        raise ConformError(
            "srs", f"{srs!r} is not of the form EPSG:<code>",
            message=f"srs {srs!r} is not of the form EPSG:<code>",
        )
    try:
        return pyproj.CRS.from_epsg(int(match.group(1)))
    except pyproj.exceptions.CRSError as exc:
        detail = f"{srs!r} is not a known EPSG code: {exc}"
        raise ConformError("srs", detail, message=f"srs {detail}") from exc


@functools.lru_cache(maxsize=64)
def _transformer(crs: pyproj.CRS) -> pyproj.Transformer | None:
    """A cached transformer to EPSG:4326, or None when ``crs`` already is lon/lat WGS84."""
    if crs.equals(WGS84, ignore_axis_order=True):
        return None
    return pyproj.Transformer.from_crs(crs, WGS84, always_xy=True)


def _to_wgs84(x: np.ndarray, y: np.ndarray, crs: pyproj.CRS) -> tuple[np.ndarray, np.ndarray]:
    transformer = _transformer(crs)
    if transformer is None:
        return x, y
    lon, lat = transformer.transform(x, y, errcheck=False)
    # PROJ marks points it cannot transform with inf; NaN is this module's "no coordinate".
    lon = np.where(np.isfinite(lon), lon, np.nan)
    lat = np.where(np.isfinite(lat), lat, np.nan)
    return np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)


def parse_floats(values: pa.Array) -> np.ndarray:
    """Text to float64, NaN where empty or unparsable; a decimal comma counts as a point."""
    if pa.types.is_floating(values.type) or pa.types.is_integer(values.type):
        return _finite(np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64))
    text = values if pa.types.is_string(values.type) else values.cast(pa.string())
    try:
        # Most batches are plain numbers: Arrow's own parser takes them in one pass. Anything
        # it refuses (an empty cell, spaces, a decimal comma) sends the batch the long way.
        return _finite(np.asarray(
            text.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64
        ))
    except pa.ArrowInvalid:
        pass
    # The reference replaced every comma with a point (European decimal commas).
    text = pc.utf8_trim_whitespace(pc.replace_substring(text, ",", "."))
    parsable = pc.fill_null(pc.match_substring_regex(text, _FLOAT_PATTERN), False)
    numbers = pc.if_else(parsable, text, pa.scalar(None, pa.string())).cast(pa.float64())
    return np.asarray(numbers.to_numpy(zero_copy_only=False), dtype=np.float64)


def _finite(numbers: np.ndarray) -> np.ndarray:
    # "inf" and "nan" parse, but are no coordinate, as on the long way.
    return np.where(np.isfinite(numbers), numbers, np.nan)


def lonlat_from_columns(
    lon: pa.Array, lat: pa.Array, crs: pyproj.CRS
) -> tuple[np.ndarray, np.ndarray]:
    """Longitude and latitude in EPSG:4326 from two text columns in ``crs`` (x, then y)."""
    return _to_wgs84(parse_floats(lon), parse_floats(lat), crs)


def _geometries(wkb: pa.Array) -> np.ndarray:
    if isinstance(wkb, pa.ChunkedArray):
        wkb = wkb.combine_chunks()
    if isinstance(wkb, pa.ExtensionArray):
        wkb = wkb.storage
    raw = wkb.to_numpy(zero_copy_only=False)
    # "fix" rebuilds what GEOS can (an unclosed ring); the rest become None → no coordinate.
    return shapely.from_wkb(raw, on_invalid="fix")


def representative_points(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One point per geometry in its own CRS: points as they are, the middle (by length) of
    lines, a point guaranteed inside polygons; NaN for missing or empty geometries."""
    type_ids = shapely.get_type_id(geoms)
    points = np.full(len(geoms), None, dtype=object)
    is_point = type_ids == shapely.GeometryType.POINT
    is_line = np.isin(
        type_ids,
        [
            shapely.GeometryType.LINESTRING,
            shapely.GeometryType.LINEARRING,
            shapely.GeometryType.MULTILINESTRING,
        ],
    )
    other = (type_ids >= 0) & ~is_point & ~is_line
    points[is_point] = geoms[is_point]
    points[is_line] = shapely.line_interpolate_point(geoms[is_line], 0.5, normalized=True)
    points[other] = _points_on_surface(geoms[other])
    points[shapely.is_empty(points)] = None
    return shapely.get_x(points), shapely.get_y(points)


def _points_on_surface(geoms: np.ndarray) -> np.ndarray:
    try:
        return shapely.point_on_surface(geoms)
    except GEOSException:
        # An invalid polygon can make GEOS throw for the whole array; retry one by one and,
        # like the reference, fall back to the middle of the bounding box.
        return np.array([_point_on_surface_or_box_centre(g) for g in geoms], dtype=object)


def _point_on_surface_or_box_centre(geom: shapely.Geometry) -> shapely.Geometry | None:
    try:
        return shapely.point_on_surface(geom)
    except GEOSException:
        xmin, ymin, xmax, ymax = shapely.bounds(geom)
        return None if np.isnan(xmin) else shapely.Point((xmin + xmax) / 2, (ymin + ymax) / 2)


_WKB_POINT_BYTES = 21  # byte order, uint32 type, x, y


def _plain_points(wkb: pa.Array) -> tuple[np.ndarray, np.ndarray] | None:
    """x and y straight from the bytes when every row is a little-endian 2D WKB point.

    That is what point shapefiles and GeoJSON give, and it saves building a GEOS object
    per row; the values are the ones GEOS would return (an empty point is NaN, NaN there
    too). Anything else (nulls, other types, Z/M, big-endian) returns None.
    """
    if isinstance(wkb, pa.ChunkedArray):
        wkb = wkb.combine_chunks()
    if isinstance(wkb, pa.ExtensionArray):
        wkb = wkb.storage
    if wkb.null_count or not pa.types.is_binary(wkb.type) or len(wkb) == 0:
        return None
    _, offset_buffer, data_buffer = wkb.buffers()
    offsets = np.frombuffer(offset_buffer, dtype=np.int32)[wkb.offset : wkb.offset + len(wkb) + 1]
    start = int(offsets[0])
    if int(offsets[-1]) - start != _WKB_POINT_BYTES * len(wkb):
        return None
    if not (np.diff(offsets) == _WKB_POINT_BYTES).all():
        return None
    raw = np.frombuffer(data_buffer, dtype=np.uint8)[start : start + _WKB_POINT_BYTES * len(wkb)]
    rows = raw.reshape(len(wkb), _WKB_POINT_BYTES)
    kind = rows[:, 1:5].copy().view("<u4")[:, 0]
    if not ((rows[:, 0] == 1).all() and (kind == 1).all()):
        return None
    coordinates = rows[:, 5:].copy().view("<f8")
    return coordinates[:, 0].copy(), coordinates[:, 1].copy()


def xy_from_wkb(wkb: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """x and y of each geometry's representative point in its own CRS (NaN: none)."""
    plain = _plain_points(wkb)
    return plain if plain is not None else representative_points(_geometries(wkb))


def lonlat_from_wkb(wkb: pa.Array, crs: pyproj.CRS) -> tuple[np.ndarray, np.ndarray]:
    """Longitude and latitude in EPSG:4326 of each geometry's representative point."""
    x, y = xy_from_wkb(wkb)
    return _to_wgs84(x, y, crs)


def reproject_wkb(wkb: pa.Array, crs: pyproj.CRS) -> pa.Array:
    """Whole geometries to EPSG:4326 WKB (parcels, buildings, centerlines); nulls stay null."""
    transformer = _transformer(crs)
    if transformer is None:
        return wkb if wkb.type == pa.binary() else wkb.cast(pa.binary())
    geoms = _geometries(wkb)

    def transform(coords: np.ndarray) -> np.ndarray:
        lon, lat = transformer.transform(coords[:, 0], coords[:, 1], errcheck=False)
        return np.column_stack([lon, lat])

    reprojected = shapely.transform(geoms, transform)
    return pa.array(shapely.to_wkb(reprojected), pa.binary())


def round_coordinates(lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round to 7 decimals (about 1 cm)."""
    return np.round(lon, COORDINATE_DECIMALS), np.round(lat, COORDINATE_DECIMALS)


def valid_coordinates(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """True where a row has a usable position.

    Finite, inside [-180, 180] x [-90, 90], and not exactly (0, 0): "null island" is what a
    source's zero placeholder for an unknown position turns into, never a real address.
    """
    lon = np.asarray(lon, dtype=np.float64)
    lat = np.asarray(lat, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        in_range = (np.abs(lon) <= 180.0) & (np.abs(lat) <= 90.0)
    null_island = (lon == 0.0) & (lat == 0.0)
    return np.isfinite(lon) & np.isfinite(lat) & in_range & ~null_island

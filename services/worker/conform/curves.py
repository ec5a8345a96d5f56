"""Curved geometries (arcs) turned into straight segments, right where they are read.

FileGDB and GeoPackage layers, parcels above all, hold true curves: ISO WKB ``CircularString``,
``CompoundCurve``, ``CurvePolygon``, ``MultiCurve`` and ``MultiSurface``. GEOS (so shapely)
refuses them, and GeoJSON has no arcs, so a curved parcel would get no coordinate and no
shape. The reader passes its WKB through :func:`linearize`; everything downstream only ever sees
points, lines and polygons.

An arc through three points is replaced by points on the same circle at most
:data:`ARC_STEP_DEGREES` apart (GDAL's default step for the same job is 4°), its end points
kept exactly, so neighbouring parcels that share an arc still share its vertices. Only 2D is
kept (Z and M are dropped): outputs are 2D. Linear geometries are passed through untouched;
looking for curves costs one pass over the type codes, with no Python per row.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Final

import numpy as np
import pyarrow as pa

ARC_STEP_DEGREES: Final = 4.0

_POINT, _LINESTRING, _POLYGON = 1, 2, 3
_MULTIPOINT, _MULTILINESTRING, _MULTIPOLYGON, _COLLECTION = 4, 5, 6, 7
_CIRCULARSTRING, _COMPOUNDCURVE, _CURVEPOLYGON, _MULTICURVE, _MULTISURFACE = 8, 9, 10, 11, 12
_CURVED: Final = frozenset(
    {_CIRCULARSTRING, _COMPOUNDCURVE, _CURVEPOLYGON, _MULTICURVE, _MULTISURFACE}
)
# EWKB flags (PostGIS style); ISO WKB adds 1000 (Z), 2000 (M) or 3000 (ZM) to the code instead.
_EWKB_Z, _EWKB_M, _EWKB_SRID = 0x80000000, 0x40000000, 0x20000000

Point = tuple[float, float]


class CurveError(ValueError):
    """The WKB is truncated or holds a type this module does not know."""


def linearize(wkb: pa.Array) -> pa.Array:
    """``wkb`` with every curved geometry replaced by a linear one (same row order, nulls kept).

    Returns ``wkb`` itself when it holds no curve. A curved value that cannot be parsed becomes
    null, which downstream counts as a row without usable geometry.
    """
    rows = _curved_rows(wkb)
    if rows.size == 0:
        return wkb
    values = wkb.to_pylist()
    for row in rows.tolist():
        try:
            values[row] = linearize_one(values[row])
        except (CurveError, struct.error):
            values[row] = None
    return pa.array(values, type=pa.binary())


def _curved_rows(wkb: pa.Array) -> np.ndarray:
    """Indexes of the values whose top-level type is a curve, or a collection (which may
    hold one); found from the type codes in the buffer, without a per-row call."""
    if len(wkb) == 0 or wkb.null_count == len(wkb) or wkb.buffers()[2] is None:
        return np.empty(0, dtype=np.int64)
    offsets = np.frombuffer(wkb.buffers()[1], dtype=np.int32)[wkb.offset:wkb.offset + len(wkb) + 1]
    data = np.frombuffer(wkb.buffers()[2], dtype=np.uint8)
    starts = offsets[:-1].astype(np.int64)
    long_enough = (offsets[1:] - offsets[:-1]) >= 5
    if wkb.null_count:
        long_enough &= wkb.is_valid().to_numpy(zero_copy_only=False)
    index = np.flatnonzero(long_enough)
    first = starts[index]
    raw = np.stack([data[first + k].astype(np.uint32) for k in range(1, 5)])
    little = raw[0] | raw[1] << 8 | raw[2] << 16 | raw[3] << 24
    big = raw[3] | raw[2] << 8 | raw[1] << 16 | raw[0] << 24
    code = np.where(data[first] == 1, little, big)
    base = (code & 0x0FFFFFFF) % 1000
    candidate = np.isin(base, [*_CURVED, _COLLECTION])
    return index[candidate]


def linearize_one(wkb: bytes) -> bytes:
    """One WKB geometry, curves approximated by lines, as 2D little-endian ISO WKB."""
    reader = _Reader(wkb)
    geometry = reader.geometry()
    return _write(geometry)


# --- reading ------------------------------------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, fmt: str) -> tuple[Any, ...]:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise CurveError("the WKB ends early")
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values

    def geometry(self) -> tuple[int, Any]:
        """(linear type, value): a point, a list of points, of rings, or of geometries."""
        (order,) = self._take("B")
        if order not in (0, 1):
            raise CurveError(f"byte order {order} is neither 0 nor 1")
        end = "<" if order == 1 else ">"
        (code,) = self._take(end + "I")
        dims = 2 + (1 if code & _EWKB_Z else 0) + (1 if code & _EWKB_M else 0)
        if code & _EWKB_SRID:
            self._take(end + "I")
        code &= 0x0FFFFFFF
        iso, kind = divmod(code, 1000)
        dims += {0: 0, 1: 1, 2: 1, 3: 2}.get(iso, 0)
        if kind == _POINT:
            point = self._take(end + "d" * dims)
            return _POINT, (point[0], point[1])
        if kind in (_LINESTRING, _CIRCULARSTRING):
            points = self._points(end, dims)
            return _LINESTRING, points if kind == _LINESTRING else _arc_string(points)
        if kind == _COMPOUNDCURVE:
            return _LINESTRING, _joined([self._line() for _ in range(self._count(end))])
        if kind == _POLYGON:
            return _POLYGON, [self._points(end, dims) for _ in range(self._count(end))]
        if kind == _CURVEPOLYGON:
            return _POLYGON, [self._line() for _ in range(self._count(end))]
        if kind == _MULTIPOINT:
            return _MULTIPOINT, [self.geometry()[1] for _ in range(self._count(end))]
        if kind in (_MULTILINESTRING, _MULTICURVE):
            return _MULTILINESTRING, [self._line() for _ in range(self._count(end))]
        if kind in (_MULTIPOLYGON, _MULTISURFACE):
            return _MULTIPOLYGON, [self._polygon() for _ in range(self._count(end))]
        if kind == _COLLECTION:
            return _COLLECTION, [self.geometry() for _ in range(self._count(end))]
        raise CurveError(f"WKB geometry type {code} is not supported")

    def _count(self, end: str) -> int:
        (count,) = self._take(end + "I")
        return int(count)

    def _points(self, end: str, dims: int) -> list[Point]:
        count = self._count(end)
        flat = self._take(end + "d" * (dims * count))
        return [(flat[i], flat[i + 1]) for i in range(0, dims * count, dims)]

    def _line(self) -> list[Point]:
        kind, value = self.geometry()
        if kind != _LINESTRING:
            raise CurveError("a curve holds something that is not a curve")
        return list(value)

    def _polygon(self) -> list[list[Point]]:
        kind, value = self.geometry()
        if kind != _POLYGON:
            raise CurveError("a surface holds something that is not a surface")
        return list(value)


def _joined(parts: list[list[Point]]) -> list[Point]:
    points: list[Point] = []
    for part in parts:
        if points and part and part[0] == points[-1]:
            part = part[1:]
        points.extend(part)
    return points


# --- arcs ---------------------------------------------------------------------------------------


def _arc_string(points: list[Point]) -> list[Point]:
    """A circular string (arcs through points 0-1-2, 2-3-4, ...) as line vertices."""
    if len(points) < 3:
        return points
    out = [points[0]]
    for start in range(0, len(points) - 2, 2):
        out.extend(arc(points[start], points[start + 1], points[start + 2])[1:])
    return out


def arc(p0: Point, p1: Point, p2: Point, step_degrees: float = ARC_STEP_DEGREES) -> list[Point]:
    """Vertices along the circular arc from ``p0`` through ``p1`` to ``p2``, ends exact.

    ``p0 == p2`` is a full circle whose diameter is ``p0``-``p1``. Three points in a line give
    that line.
    """
    # Work relative to p0: projected coordinates are large (millions of feet), and squaring
    # them loses the precision the centre needs.
    bx, by = p1[0] - p0[0], p1[1] - p0[1]
    cx, cy = p2[0] - p0[0], p2[1] - p0[1]
    if (cx, cy) == (0.0, 0.0):
        ux, uy = bx / 2, by / 2
        radius = math.hypot(ux, uy)
        if radius == 0:
            return [p0, p2]
        start = math.atan2(-uy, -ux)
        sweep = 2 * math.pi  # counter-clockwise, as the through-point cannot tell
    else:
        cross = bx * cy - by * cx
        if abs(cross) <= 1e-12 * math.hypot(bx, by) * math.hypot(cx - bx, cy - by):
            return [p0, p1, p2]
        d = 2 * cross
        ux = (cy * (bx * bx + by * by) - by * (cx * cx + cy * cy)) / d
        uy = (bx * (cx * cx + cy * cy) - cx * (bx * bx + by * by)) / d
        radius = math.hypot(ux, uy)
        start = math.atan2(-uy, -ux)
        end = math.atan2(cy - uy, cx - ux)
        if cross > 0:  # counter-clockwise
            sweep = (end - start) % (2 * math.pi)
        else:
            sweep = -((start - end) % (2 * math.pi))
    steps = max(2, math.ceil(abs(sweep) / math.radians(step_degrees)))
    inner = [
        (p0[0] + ux + radius * math.cos(start + sweep * i / steps),
         p0[1] + uy + radius * math.sin(start + sweep * i / steps))
        for i in range(1, steps)
    ]
    return [p0, *inner, p2]


# --- writing ------------------------------------------------------------------------------------


def _write(geometry: tuple[int, Any]) -> bytes:
    kind, value = geometry
    head = struct.pack("<BI", 1, kind)
    if kind == _POINT:
        return head + struct.pack("<2d", *value)
    if kind == _LINESTRING:
        return head + _points_bytes(value)
    if kind == _POLYGON:
        return head + struct.pack("<I", len(value)) + b"".join(map(_points_bytes, value))
    members: list[tuple[int, Any]]
    if kind == _MULTIPOINT:
        members = [(_POINT, v) for v in value]
    elif kind == _MULTILINESTRING:
        members = [(_LINESTRING, v) for v in value]
    elif kind == _MULTIPOLYGON:
        members = [(_POLYGON, v) for v in value]
    else:
        members = value
    return head + struct.pack("<I", len(members)) + b"".join(map(_write, members))


def _points_bytes(points: list[Point]) -> bytes:
    flat = [c for point in points for c in point]
    return struct.pack(f"<I{len(flat)}d", len(points), *flat)

"""Esri JSON features to GeoJSON, and to the lines of the dump.

Esri rings go outer clockwise, holes counter-clockwise, any number of outers in one geometry;
GeoJSON (RFC 7946) wants polygons of one outer ring counter-clockwise and its holes clockwise.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

JSON = dict[str, Any]
Position = list[float]
Ring = list[Position]



def _position(raw: Any) -> Position | None:
    if not isinstance(raw, list | tuple) or len(raw) < 2:
        return None
    x, y = raw[0], raw[1]
    if not isinstance(x, int | float) or not isinstance(y, int | float):
        return None
    if math.isnan(x) or math.isnan(y):
        return None
    return [float(x), float(y)]


def _positions(raw: Any) -> list[Position]:
    return [p for p in (_position(item) for item in raw or []) if p is not None]


def _closed(ring: Ring) -> Ring:
    return ring if ring[0] == ring[-1] else [*ring, ring[0]]


def _signed_area(ring: Ring) -> float:
    """Twice the signed area; negative means clockwise (x east, y north)."""
    return sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in itertools.pairwise(ring))


def _contains(ring: Ring, point: Position) -> bool:
    # Even-odd ray casting; good enough to decide which outer ring a hole belongs to.
    x, y = point
    inside = False
    for (x1, y1), (x2, y2) in itertools.pairwise(ring):
        if (y1 > y) != (y2 > y) and x < (x2 - x1) * (y - y1) / (y2 - y1) + x1:
            inside = not inside
    return inside


def _polygons(rings_raw: Any) -> list[list[Ring]]:
    """Group Esri rings (outer clockwise, holes counter-clockwise) into GeoJSON polygons
    (outer counter-clockwise, holes clockwise, as RFC 7946 asks)."""
    rings = [_closed(r) for r in (_positions(raw) for raw in rings_raw or []) if len(r) >= 3]
    rings = [r for r in rings if len(r) >= 4]
    outers = [r for r in rings if _signed_area(r) < 0]
    holes = [r for r in rings if _signed_area(r) >= 0]
    polygons: list[list[Ring]] = [[outer[::-1]] for outer in outers]
    for hole in holes:
        owner = next(
            (p for p, o in zip(polygons, outers, strict=True) if _contains(o, hole[0])), None
        )
        if owner is None:
            # A counter-clockwise ring inside nothing: a server that got the winding wrong.
            polygons.append([hole])
            outers.append(hole[::-1])
        else:
            owner.append(hole[::-1])
    return polygons


def to_geojson_geometry(geometry: Mapping[str, Any] | None) -> JSON | None:
    """Convert an Esri JSON geometry to a GeoJSON one; None when missing or empty."""
    if not geometry:
        return None
    if "x" in geometry:
        point = _position([geometry.get("x"), geometry.get("y")])
        return {"type": "Point", "coordinates": point} if point else None
    if "points" in geometry:
        points = _positions(geometry["points"])
        if not points:
            return None
        if len(points) == 1:
            return {"type": "Point", "coordinates": points[0]}
        return {"type": "MultiPoint", "coordinates": points}
    if "paths" in geometry:
        paths = [p for p in (_positions(raw) for raw in geometry["paths"] or []) if len(p) >= 2]
        if not paths:
            return None
        if len(paths) == 1:
            return {"type": "LineString", "coordinates": paths[0]}
        return {"type": "MultiLineString", "coordinates": paths}
    if "rings" in geometry:
        polygons = _polygons(geometry["rings"])
        if not polygons:
            return None
        if len(polygons) == 1:
            return {"type": "Polygon", "coordinates": polygons[0]}
        return {"type": "MultiPolygon", "coordinates": polygons}
    return None


def to_geojson_feature(feature: Mapping[str, Any]) -> JSON:
    return {
        "type": "Feature",
        "properties": dict(feature.get("attributes") or {}),
        "geometry": to_geojson_geometry(feature.get("geometry")),
    }


def encode_lines(features: Sequence[Mapping[str, Any]]) -> bytes:
    """The features as GeoJSON lines, the bytes of the dump (compact: GDAL reads them)."""
    return b"".join(
        json.dumps(to_geojson_feature(f), ensure_ascii=False, separators=(",", ":")).encode()
        + b"\n"
        for f in features
    )

"""Country, US state and US county shapes for the coverage maps, from the TopoJSON files in
``shared/data/boundaries/`` (their origin and licence are in the README there).

TopoJSON stores each shared border once, as an *arc* of quantized, delta-encoded positions;
a polygon's rings list arcs by index (``~i`` for arc ``i`` reversed). :func:`decode` turns an
object of such a file into shapely geometries by id; loading the three collections takes
about half a second, done once per process (:func:`functools.cache`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import iso3166
import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

COUNTRIES_FILE = "countries-50m.topo.json"
US_FILE = "us-counties-10m.topo.json"


def _arcs(topology: Mapping[str, Any]) -> list[np.ndarray]:
    transform = topology.get("transform")
    arcs = []
    for arc in topology["arcs"]:
        points = np.asarray(arc, dtype=np.float64)
        if transform is not None:
            points = np.cumsum(points, axis=0) * transform["scale"] + transform["translate"]
        arcs.append(points)
    return arcs


def _ring(indexes: Sequence[int], arcs: list[np.ndarray]) -> np.ndarray:
    parts = []
    for position, index in enumerate(indexes):
        points = arcs[index] if index >= 0 else arcs[~index][::-1]
        # Each arc starts where the last one ended: that point is written once.
        parts.append(points if position == 0 else points[1:])
    return np.concatenate(parts)


def _polygon(rings: Sequence[Sequence[int]], arcs: list[np.ndarray]) -> BaseGeometry | None:
    coordinates = [_ring(ring, arcs) for ring in rings]
    if not coordinates or len(coordinates[0]) < 4:
        return None
    exterior = coordinates[0]
    if np.any(np.abs(np.diff(exterior[:, 0])) > 180):
        return _across_antimeridian(exterior)
    return shapely.Polygon(exterior, [ring for ring in coordinates[1:] if len(ring) >= 4])


def _across_antimeridian(ring: np.ndarray) -> BaseGeometry:
    """A ring that jumps between +180 and -180 (TopoJSON leaves cutting to the renderer, as
    on a sphere): unwrapped into one continuous ring, closed over the pole when it goes round
    it (Antarctica), then cut at ±180 into parts inside -180..180. Holes are dropped."""
    lon = ring[:, 0].copy()
    steps = np.diff(lon)
    lon[1:] -= 360 * np.cumsum(np.round(steps / 360))
    unwrapped = np.column_stack((lon, ring[:, 1]))
    if abs(lon[-1] - lon[0]) > 180:
        pole = -90.0 if np.mean(ring[:, 1]) < 0 else 90.0
        unwrapped = np.vstack((unwrapped, [(lon[-1], pole), (lon[0], pole), unwrapped[0]]))
    polygon = shapely.make_valid(shapely.Polygon(unwrapped))
    parts = []
    for shift in (-360.0, 0.0, 360.0):
        window = shapely.box(-180 - shift, -90, 180 - shift, 90)
        piece = shapely.intersection(polygon, window)
        if not piece.is_empty:
            parts.append(shapely.transform(piece, lambda xy, d=shift: xy + np.array([d, 0.0])))
    pieces = [part for piece in parts for part in shapely.get_parts(piece)
              if part.geom_type == "Polygon" and not part.is_empty]
    return shapely.MultiPolygon(pieces) if len(pieces) != 1 else pieces[0]


def decode(topology: Mapping[str, Any], name: str) -> dict[str, BaseGeometry]:
    """The geometries of the collection ``name`` by their ``id`` (those without one left out)."""
    arcs = _arcs(topology)
    shapes: dict[str, BaseGeometry] = {}
    for geometry in topology["objects"][name]["geometries"]:
        ident = geometry.get("id")
        if ident is None:
            continue
        if geometry["type"] == "Polygon":
            polygons = [_polygon(geometry["arcs"], arcs)]
        elif geometry["type"] == "MultiPolygon":
            polygons = [_polygon(rings, arcs) for rings in geometry["arcs"]]
        else:
            continue
        valid = [part for polygon in polygons if polygon is not None
                 for part in shapely.get_parts(polygon)]
        if valid:
            shapes[str(ident)] = shapely.MultiPolygon(valid) if len(valid) > 1 else valid[0]
    return shapes


def _load(file: str) -> dict[str, Any]:
    path = resources.files("shared").joinpath("data", "boundaries", file)
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


@functools.cache
def countries() -> dict[str, BaseGeometry]:
    """Countries by lower-case ISO 3166-1 alpha-2 code (Natural Earth 1:50m)."""
    by_numeric = decode(_load(COUNTRIES_FILE), "countries")
    return {country.alpha2.lower(): by_numeric[country.numeric]
            for country in iso3166.countries if country.numeric in by_numeric}


@functools.cache
def _us() -> dict[str, Any]:
    return _load(US_FILE)


@functools.cache
def us_states() -> dict[str, BaseGeometry]:
    """US states, DC and territories by 2-digit FIPS code (Census 2017)."""
    return decode(_us(), "states")


@functools.cache
def us_counties() -> dict[str, BaseGeometry]:
    """US counties by 5-digit GEOID (Census 2017)."""
    return decode(_us(), "counties")

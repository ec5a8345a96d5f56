"""Curves: arcs become lines on read, checked against circle geometry and real GDAL files.

The curved WKB is built by hand here (struct, ISO layout), independently of the module's own
writer; GeoPackage and FileGDB files holding curves are written by GDAL through pyogrio.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import shapely
from pyogrio.raw import write_arrow

from services.worker.conform.curves import arc, linearize, linearize_one
from services.worker.conform.geometry import lonlat_from_wkb, reproject_wkb
from services.worker.conform.readers import GEOMETRY_COLUMN, open_reader


def points_wkb(points: list[tuple[float, ...]]) -> bytes:
    flat = [c for p in points for c in p]
    return struct.pack(f"<I{len(flat)}d", len(points), *flat)


def circular(points: list[tuple[float, ...]], code: int = 8, order: str = "<") -> bytes:
    flat = [c for p in points for c in p]
    return struct.pack(f"{order}BI", 1 if order == "<" else 0, code) + struct.pack(
        f"{order}I{len(flat)}d", len(points), *flat)


def line(points: list[tuple[float, float]]) -> bytes:
    return struct.pack("<BI", 1, 2) + points_wkb(points)


def compound(*parts: bytes) -> bytes:
    return struct.pack("<BII", 1, 9, len(parts)) + b"".join(parts)


def curve_polygon(*rings: bytes) -> bytes:
    return struct.pack("<BII", 1, 10, len(rings)) + b"".join(rings)


# A "D": the upper half of the unit disk around (1, 0) closed by its diameter. Area pi/2.
D_RING = compound(circular([(0, 0), (1, 1), (2, 0)]), line([(2, 0), (0, 0)]))
D_AREA = math.pi / 2


def distances_from(points: list[tuple[float, float]], centre: tuple[float, float]) -> np.ndarray:
    return np.hypot(*(np.array(points) - np.array(centre)).T)


def test_half_circle_clockwise_stays_on_the_circle_through_its_middle_point() -> None:
    points = arc((0, 0), (1, 1), (2, 0))
    assert points[0] == (0, 0) and points[-1] == (2, 0)
    np.testing.assert_allclose(distances_from(points, (1, 0)), 1, atol=1e-12)
    assert min(y for _, y in points) >= -1e-12  # the upper half, where (1, 1) is
    assert len(points) == 180 // 4 + 1


def test_half_circle_counter_clockwise_is_the_lower_half() -> None:
    points = arc((0, 0), (1, -1), (2, 0))
    np.testing.assert_allclose(distances_from(points, (1, 0)), 1, atol=1e-12)
    assert max(y for _, y in points) <= 1e-12


def test_short_arc_and_large_projected_coordinates() -> None:
    # A 90° arc of radius 50 ft in California state plane (millions of feet).
    cx, cy = 6_010_000.0, 2_110_000.0
    p0, p1, p2 = (cx + 50, cy), (cx + 50 * math.cos(math.pi / 4), cy + 50 * math.sin(math.pi / 4)),\
        (cx, cy + 50)
    points = arc(p0, p1, p2)
    np.testing.assert_allclose(distances_from(points, (cx, cy)), 50, atol=1e-6)
    assert len(points) == 90 // 4 + 2  # ceil(90 / 4) steps


def test_full_circle_and_degenerate_arcs() -> None:
    circle = arc((0, 0), (2, 0), (0, 0))
    assert circle[0] == circle[-1] == (0, 0)
    assert shapely.Polygon(circle).area == pytest.approx(math.pi, rel=1e-2)
    assert arc((0, 0), (1, 1), (2, 2)) == [(0, 0), (1, 1), (2, 2)]  # collinear: a line
    assert arc((3, 3), (3, 3), (3, 3)) == [(3, 3), (3, 3)]


def test_curve_polygon_becomes_a_polygon_of_the_same_area() -> None:
    polygon = shapely.from_wkb(linearize_one(curve_polygon(D_RING)))
    assert polygon.geom_type == "Polygon" and polygon.is_valid
    assert polygon.area == pytest.approx(D_AREA, rel=2e-3)
    assert polygon.exterior.coords[0] == polygon.exterior.coords[-1] == (0, 0)


def test_multi_surface_multi_curve_z_and_big_endian() -> None:
    surface = struct.pack("<BII", 1, 12, 2) + curve_polygon(D_RING) + (
        struct.pack("<BII", 1, 3, 1) + points_wkb([(5, 5), (6, 5), (6, 6), (5, 5)]))
    multi = shapely.from_wkb(linearize_one(surface))
    assert multi.geom_type == "MultiPolygon" and len(multi.geoms) == 2
    assert multi.area == pytest.approx(D_AREA + 0.5, rel=2e-3)

    curves = struct.pack("<BII", 1, 11, 2) + circular([(0, 0), (1, 1), (2, 0)]) + line(
        [(2, 0), (3, 0)])
    lines = shapely.from_wkb(linearize_one(curves))
    assert lines.geom_type == "MultiLineString"
    assert lines.length == pytest.approx(math.pi + 1, rel=1e-3)

    # ISO Z (1008) and big-endian: Z is dropped, the arc is the same.
    with_z = circular([(0, 0, 7), (1, 1, 7), (2, 0, 7)], code=1008, order=">")
    flat = shapely.from_wkb(linearize_one(with_z))
    assert not flat.has_z and flat.length == pytest.approx(math.pi, rel=1e-3)


def test_linearize_keeps_linear_rows_and_nulls_and_returns_the_same_array() -> None:
    linear = pa.array([shapely.to_wkb(shapely.Point(1, 2)), None,
                       shapely.to_wkb(shapely.LineString([(0, 0), (1, 1)]))], pa.binary())
    assert linearize(linear) is linear
    mixed = pa.array([linear[0].as_py(), curve_polygon(D_RING), None, b"\x01\x0a\x00\x00\x00"],
                     pa.binary())
    out = linearize(mixed[0:4])
    assert out[0].as_py() == linear[0].as_py()
    assert shapely.from_wkb(out[1].as_py()).geom_type == "Polygon"
    assert out[2].as_py() is None
    assert out[3].as_py() is None  # a truncated curve becomes no geometry, not a crash


@pytest.mark.parametrize(("driver", "suffix"), [("GPKG", ".gpkg"), ("OpenFileGDB", ".gdb")])
def test_curved_parcels_in_real_files_read_as_polygons(
    tmp_path: Path, driver: str, suffix: str
) -> None:
    # A lot in California state plane (US feet) whose front is an arc, as county parcels are.
    x0, y0 = 6_010_000.0, 2_110_000.0
    ring = compound(
        circular([(x0, y0), (x0 + 50, y0 - 20), (x0 + 100, y0)]),
        line([(x0 + 100, y0), (x0 + 100, y0 + 100), (x0, y0 + 100), (x0, y0)]),
    )
    table = pa.table({"APN": pa.array(["1-2-3"]),
                      "geometry": pa.array([curve_polygon(ring)], pa.binary())})
    path = tmp_path / f"parcels{suffix}"
    write_arrow(table, str(path), driver=driver, geometry_name="geometry",
                geometry_type="Unknown" if driver == "GPKG" else "Polygon",
                crs="EPSG:2227", layer="parcels")
    # GDAL keeps the arcs: CurvePolygon in the GeoPackage, MultiSurface in the FileGDB.
    with open_reader(path, {"format": "gpkg" if driver == "GPKG" else "gdb"}) as reader:
        batch = next(iter(reader.batches()))
        wkb = batch.column(GEOMETRY_COLUMN)
        polygon = shapely.from_wkb(wkb[0].as_py())
        assert polygon.geom_type in ("Polygon", "MultiPolygon") and polygon.is_valid
        # 100 x 100 ft minus the segment cut by the arc (chord 100, sagitta 20).
        radius = (50**2 + 20**2) / (2 * 20)
        half = math.asin(50 / radius)
        segment = radius**2 * (2 * half - math.sin(2 * half)) / 2
        assert polygon.area == pytest.approx(100 * 100 + segment, rel=1e-3)
        lon, lat = lonlat_from_wkb(wkb, reader.crs)
        assert -123 < lon[0] < -121 and 37 < lat[0] < 39
        shapes = shapely.from_wkb(reproject_wkb(wkb, reader.crs)[0].as_py())
        assert shapes.geom_type == polygon.geom_type

"""Geometry: CRS choice, reprojection against independently computed coordinates, points.

Expected positions are never computed with pyproj: projected coordinates come from the
textbook map-projection formulas below (Snyder, "Map Projections: A Working Manual", USGS
1987) with the published EPSG parameters, and are checked to about a metre.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyproj
import pytest
import shapely

from services.worker.conform import geometry
from services.worker.conform.geometry import (
    WGS84,
    lonlat_from_columns,
    lonlat_from_wkb,
    reproject_wkb,
    round_coordinates,
    source_crs,
    valid_coordinates,
)
from services.worker.errors import RunError

# GRS80, the ellipsoid of NAD83, ETRS89 and Korea 2000.
A_M = 6378137.0
E2 = 0.00669438002290
E = math.sqrt(E2)
US_FOOT_M = 1200 / 3937
# One metre in degrees of latitude, and of longitude at the latitudes used here (~50°).
METRE_DEG = 1 / 111_000
TOLERANCE_DEG = 1.5 * METRE_DEG / math.cos(math.radians(50))


def meridian_arc_m(lat_deg: float) -> float:
    """Distance along the GRS80 meridian from the equator (Snyder eq. 3-21)."""
    phi = math.radians(lat_deg)
    e4, e6 = E2 * E2, E2 * E2 * E2
    return A_M * (
        (1 - E2 / 4 - 3 * e4 / 64 - 5 * e6 / 256) * phi
        - (3 * E2 / 8 + 3 * e4 / 32 + 45 * e6 / 1024) * math.sin(2 * phi)
        + (15 * e4 / 256 + 45 * e6 / 1024) * math.sin(4 * phi)
        - (35 * e6 / 3072) * math.sin(6 * phi)
    )


def lcc_forward_m(
    lon: float, lat: float, *, lat1: float, lat2: float, lat0: float, lon0: float
) -> tuple[float, float]:
    """Lambert conformal conic with two standard parallels (Snyder eqs. 15-7 to 15-11)."""

    def m(phi: float) -> float:
        return math.cos(phi) / math.sqrt(1 - E2 * math.sin(phi) ** 2)

    def t(phi: float) -> float:
        return math.tan(math.pi / 4 - phi / 2) / (
            ((1 - E * math.sin(phi)) / (1 + E * math.sin(phi))) ** (E / 2)
        )

    p1, p2, p0, p = (math.radians(v) for v in (lat1, lat2, lat0, lat))
    n = (math.log(m(p1)) - math.log(m(p2))) / (math.log(t(p1)) - math.log(t(p2)))
    big_f = m(p1) / (n * t(p1) ** n)
    rho0 = A_M * big_f * t(p0) ** n
    rho = A_M * big_f * t(p) ** n
    theta = n * math.radians(lon - lon0)
    return rho * math.sin(theta), rho0 - rho * math.cos(theta)


def strings(*values: str) -> pa.Array:
    return pa.array(values, pa.string())


# -- source_crs ---------------------------------------------------------------------------


def test_srs_overrides_the_file_crs() -> None:
    crs = source_crs({"srs": "EPSG:2227"}, pyproj.CRS.from_epsg(25832))
    assert crs.to_epsg() == 2227


def test_file_crs_is_used_without_srs() -> None:
    assert source_crs({}, pyproj.CRS.from_epsg(25832)).to_epsg() == 25832


def test_default_is_wgs84() -> None:
    assert source_crs({}, None).to_epsg() == 4326


@pytest.mark.parametrize("srs", ["EPSG:999999", "ESRI:102100", "+proj=longlat", "EPSG:"])
def test_bad_srs_fails_the_conform(srs: str) -> None:
    with pytest.raises(RunError) as raised:
        source_crs({"srs": srs}, None)
    assert raised.value.problem == "conform_failed"
    assert srs in str(raised.value)


# -- reprojection of text columns ---------------------------------------------------------


def test_california_state_plane_feet_san_francisco_city_hall() -> None:
    # EPSG:2227, NAD83 / California zone 3 (ftUS): parallels 38°26' and 37°04', origin
    # 36°30' N 120°30' W, false easting 2 000 000 m, false northing 500 000 m (given in
    # the CRS as 6 561 666.667 and 1 640 416.667 ftUS).
    lon, lat = -122.41924, 37.77927
    x_m, y_m = lcc_forward_m(lon, lat, lat1=38 + 26 / 60, lat2=37 + 4 / 60, lat0=36.5, lon0=-120.5)
    x_ft = (x_m + 2_000_000) / US_FOOT_M
    y_ft = (y_m + 500_000) / US_FOOT_M
    assert 5_990_000 < x_ft < 6_020_000 and 2_100_000 < y_ft < 2_130_000  # sanity of the maths

    out_lon, out_lat = lonlat_from_columns(
        strings(f"{x_ft:.3f}"), strings(f"{y_ft:.3f}"), source_crs({"srs": "EPSG:2227"}, None)
    )
    assert out_lon[0] == pytest.approx(lon, abs=TOLERANCE_DEG)
    assert out_lat[0] == pytest.approx(lat, abs=METRE_DEG)


def test_korea_unified_coordinate_system() -> None:
    # EPSG:5179, Korea 2000 / Unified CS: transverse Mercator, central meridian 127°30' E,
    # origin latitude 38° N, scale 0.9996, false easting 1 000 000 m, false northing
    # 2 000 000 m. On the central meridian northing is the scaled meridian arc.
    lat = 37.5665
    northing = 2_000_000 + 0.9996 * (meridian_arc_m(lat) - meridian_arc_m(38.0))
    out_lon, out_lat = lonlat_from_columns(
        strings("1000000"), strings(f"{northing:.3f}"), source_crs({"srs": "EPSG:5179"}, None)
    )
    assert out_lon[0] == pytest.approx(127.5, abs=TOLERANCE_DEG)
    assert out_lat[0] == pytest.approx(lat, abs=METRE_DEG)


def test_germany_utm_zone_32() -> None:
    # EPSG:25832, ETRS89 / UTM 32N: central meridian 9° E, scale 0.9996, false easting
    # 500 000 m. 50° N on the central meridian (near Aschaffenburg).
    northing = 0.9996 * meridian_arc_m(50.0)
    out_lon, out_lat = lonlat_from_columns(
        strings("500000"), strings(f"{northing:.3f}"), source_crs({"srs": "EPSG:25832"}, None)
    )
    assert out_lon[0] == pytest.approx(9.0, abs=TOLERANCE_DEG)
    assert out_lat[0] == pytest.approx(50.0, abs=METRE_DEG)


def test_geographic_crs_with_latitude_first_axis_keeps_x_as_longitude() -> None:
    # EPSG:4617 (NAD83(CSRS)) lists latitude first; sources still write x = longitude.
    # Parliament Hill, Ottawa: 45.4236 N, 75.7009 W. NAD83(CSRS) and WGS84 differ by ~1 m.
    out_lon, out_lat = lonlat_from_columns(
        strings("-75.7009"), strings("45.4236"), source_crs({"srs": "EPSG:4617"}, None)
    )
    assert out_lon[0] == pytest.approx(-75.7009, abs=2 * TOLERANCE_DEG)
    assert out_lat[0] == pytest.approx(45.4236, abs=2 * METRE_DEG)


def test_text_parsing_decimal_comma_blanks_and_junk() -> None:
    lon, lat = lonlat_from_columns(
        pa.array(["-122,5", " 3.25 ", "", None, "n/a", "1e1"]),
        pa.array(["37,25", "4", "5", "6", "7", "2E0"]),
        WGS84,
    )
    np.testing.assert_array_equal(lon[:2], [-122.5, 3.25])
    assert np.isnan(lon[2:5]).all()
    assert (lon[5], lat[5]) == (10.0, 2.0)
    np.testing.assert_array_equal(lat[:5], [37.25, 4.0, 5.0, 6.0, 7.0])


NUMBER_TABLE = [
    ("1.5", 1.5), ("+1.5", 1.5), (".5", 0.5), ("5.", 5.0), ("-0", -0.0), ("1e1", 10.0),
    ("-122.4194155", -122.4194155), ("inf", math.nan), ("nan", math.nan),
    ("-Infinity", math.nan),
]
JUNK_TABLE = [(" 2.5 ", 2.5), ("2,5", 2.5), ("", math.nan), ("0x10", math.nan),
              ("1_000", math.nan), ("١٢", math.nan)]


@pytest.mark.parametrize(("text", "expected"), NUMBER_TABLE + JUNK_TABLE)
def test_parse_floats_the_same_alone_and_beside_junk(text: str, expected: float) -> None:
    # Alone, a plain number takes Arrow's direct cast; beside junk the batch takes the
    # trimming, comma-replacing way. Both must give the same value.
    alone = geometry.parse_floats(pa.array([text]))
    mixed = geometry.parse_floats(pa.array([text, "n/a", None]))
    for got in (alone[0], mixed[0]):
        if math.isnan(expected):
            assert math.isnan(got)
        else:
            assert got == expected and math.copysign(1, got) == math.copysign(1, expected)
    assert math.isnan(mixed[1]) and math.isnan(mixed[2])


def test_parse_floats_of_numeric_columns() -> None:
    values = geometry.parse_floats(pa.array([1.5, None, math.inf]))
    assert values[0] == 1.5 and math.isnan(values[1]) and math.isnan(values[2])
    assert geometry.parse_floats(pa.array([3, None], pa.int64()))[0] == 3.0


def test_transformers_are_cached_per_crs() -> None:
    crs = pyproj.CRS.from_epsg(2227)
    first = geometry._transformer(crs)
    assert first is not None
    assert geometry._transformer(pyproj.CRS.from_epsg(2227)) is first
    assert geometry._transformer(WGS84) is None


# -- points of geometries -----------------------------------------------------------------


def wkb(*geoms: shapely.Geometry | None) -> pa.Array:
    return pa.array(list(shapely.to_wkb(np.array(geoms, dtype=object))), pa.binary())


def test_points_lines_and_polygons_in_wgs84() -> None:
    u_shape = shapely.Polygon([(0, 0), (6, 0), (6, 6), (4, 6), (4, 2), (2, 2), (2, 6), (0, 6)])
    assert not u_shape.contains(u_shape.centroid)  # why point_on_surface and not centroid
    lon, lat = lonlat_from_wkb(
        wkb(
            shapely.Point(1.5, 2.5),
            shapely.LineString([(0, 0), (10, 0), (10, 10)]),
            u_shape,
            shapely.MultiPolygon([shapely.box(20, 20, 21, 21)]),
            None,
            shapely.Polygon(),
        ),
        WGS84,
    )
    assert (lon[0], lat[0]) == (1.5, 2.5)
    assert (lon[1], lat[1]) == (10.0, 0.0)  # halfway along 20 units of line
    assert u_shape.contains(shapely.Point(lon[2], lat[2]))
    assert 20 < lon[3] < 21 and 20 < lat[3] < 21
    assert np.isnan(lon[4:]).all() and np.isnan(lat[4:]).all()


def test_polygon_in_utm_is_reprojected_after_choosing_its_point() -> None:
    northing = 0.9996 * meridian_arc_m(50.0)
    square = shapely.box(499_990, northing - 10, 500_010, northing + 10)
    lon, lat = lonlat_from_wkb(wkb(square), pyproj.CRS.from_epsg(25832))
    assert lon[0] == pytest.approx(9.0, abs=20 * TOLERANCE_DEG)
    assert lat[0] == pytest.approx(50.0, abs=20 * METRE_DEG)


def test_reproject_wkb_keeps_shapes_and_nulls() -> None:
    northing = 0.9996 * meridian_arc_m(50.0)
    line = shapely.LineString([(500_000, northing), (500_000, northing + 1000)])
    out = reproject_wkb(wkb(line, None), pyproj.CRS.from_epsg(25832))
    assert out.type == pa.binary()
    assert out[1].as_py() is None
    moved = shapely.from_wkb(out[0].as_py())
    assert moved.geom_type == "LineString"
    (lon0, lat0), (lon1, lat1) = moved.coords
    assert lon1 == pytest.approx(9.0, abs=TOLERANCE_DEG)
    assert lon0 == pytest.approx(9.0, abs=TOLERANCE_DEG)
    assert lat0 == pytest.approx(50.0, abs=METRE_DEG)
    # 1000 m north along the central meridian is about 0.009 degrees of latitude.
    assert lat1 - lat0 == pytest.approx(1000 * METRE_DEG, rel=0.01)


def test_reproject_wkb_in_wgs84_is_unchanged() -> None:
    data = wkb(shapely.Point(1, 2))
    assert reproject_wkb(data, WGS84).to_pylist() == data.to_pylist()


# -- rounding and validity ----------------------------------------------------------------


def test_round_to_seven_decimals() -> None:
    lon, lat = round_coordinates(np.array([39.142857153, -0.142857153]), np.array([1.0, 2.0]))
    np.testing.assert_array_equal(lon, [39.1428572, -0.1428572])
    np.testing.assert_array_equal(lat, [1.0, 2.0])


def test_valid_coordinates() -> None:
    lon = np.array([10.0, 0.0, 181.0, 10.0, np.nan, np.inf, -180.0, 0.0])
    lat = np.array([50.0, 0.0, 50.0, -90.5, 50.0, 50.0, 90.0, 1.0])
    np.testing.assert_array_equal(
        valid_coordinates(lon, lat), [True, False, False, False, False, False, True, True]
    )

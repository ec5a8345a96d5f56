"""``"lon": "X", "lat": "Y"`` on files with geometry: every OGR format, point, polygon and line.

Each file is written with GDAL (pyogrio) from known WGS84 points, projected into the file's CRS
where the case says so, read back with the run's own reader and conformed with the run's own
``Conformer``; the output must come back to the known points. The expected values are the
points themselves, never the engine's arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import shapely
from shapely.geometry.base import BaseGeometry

from services.worker.conform.engine import Conformer
from services.worker.conform.readers import open_reader
from services.worker.errors import ConformError
from tests.support import sourcedata as sd

#: Known places (lon, lat): Dighton KS and two neighbours.
PLACES = [(-100.4661, 38.4817), (-100.4702, 38.4790), (-100.4599, 38.4851)]
#: Kansas South state plane (US feet): a CRS whose numbers look nothing like degrees.
STATE_PLANE = "EPSG:2241"
TOLERANCE_DEG = 1e-6

#: conform format -> (GDAL driver, file name)
FORMATS: dict[str, tuple[str, str]] = {
    "shapefile": ("ESRI Shapefile", "addresses.shp"),
    "shapefile-polygon": ("ESRI Shapefile", "parcels.shp"),
    "geojson": ("GeoJSON", "addresses.geojson"),
    "gpkg": ("GPKG", "addresses.gpkg"),
    "xml": ("GML", "addresses.gml"),
    "gdb": ("OpenFileGDB", "addresses.gdb"),
}


def shape(kind: str, place: tuple[float, float]) -> BaseGeometry:
    """A geometry whose representative point is ``place``: the point itself, a square around
    it (point on surface: its centre), a straight line through it (middle by length)."""
    x, y = place
    if kind == "point":
        return shapely.Point(x, y)
    if kind == "polygon":
        return sd.square(place, 0.0004)
    return shapely.LineString([(x - 0.0003, y - 0.0002), (x + 0.0003, y + 0.0002)])


@dataclass
class Layer:
    path: Path
    fmt: str


def write(tmp_path: Path, fmt: str, kind: str, *, crs: str = "EPSG:4326",
          records: list[dict[str, Any]] | None = None, prj: bool = True) -> Layer:
    driver, name = FORMATS[fmt]
    geometries = [shape(kind, place) for place in PLACES]
    if crs != "EPSG:4326":
        geometries = [sd.transform_geometry(g, crs) for g in geometries]
    records = records or [{"NUM": str(n), "STREET": "Main St"} for n in (12, 14, 16)]
    path = sd.write_ogr(tmp_path / fmt / name, driver, records, geometries, crs=crs)
    if not prj:
        path.with_suffix(".prj").unlink()
    return Layer(path, fmt)


def conformed(layer: Layer, conform: dict[str, Any]) -> pa.Table:
    conform = {"format": layer.fmt, **conform}
    with open_reader(layer.path, conform) as reader:
        conformer = Conformer("addresses", conform, reader.fields, reader.crs,
                              has_geometry=reader.geometry_type is not None)
        return pa.Table.from_batches([conformer.conform(b) for b in reader.batches()])


def assert_at_places(table: pa.Table, places: list[tuple[float, float]] = PLACES) -> None:
    points = list(zip(table["lon"].to_pylist(), table["lat"].to_pylist(), strict=True))
    assert len(points) == len(places)
    for (lon, lat), (want_lon, want_lat) in zip(points, places, strict=True):
        assert abs(lon - want_lon) < TOLERANCE_DEG and abs(lat - want_lat) < TOLERANCE_DEG, (
            (lon, lat), (want_lon, want_lat)
        )


XY = {"lon": "X", "lat": "Y", "number": "NUM", "street": "STREET"}


@pytest.mark.parametrize("kind", ["point", "polygon", "line"])
@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "shapefile-polygon"])
def test_x_and_y_are_the_features_point(tmp_path: Path, fmt: str, kind: str) -> None:
    table = conformed(write(tmp_path, fmt, kind), XY)
    assert_at_places(table)
    assert table["number"].to_pylist() == ["12", "14", "16"]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_x_and_y_in_the_files_projection_are_reprojected(tmp_path: Path, fmt: str) -> None:
    kind = "polygon" if fmt == "shapefile-polygon" else "point"
    assert_at_places(conformed(write(tmp_path, fmt, kind, crs=STATE_PLANE), XY))


@pytest.mark.parametrize("kind", ["point", "polygon", "line"])
def test_shapefile_without_prj_is_reprojected_by_srs(tmp_path: Path, kind: str) -> None:
    layer = write(tmp_path, "shapefile", kind, crs=STATE_PLANE, prj=False)
    assert_at_places(conformed(layer, {**XY, "srs": STATE_PLANE}))


def test_shapefile_without_prj_nor_srs_is_lon_lat(tmp_path: Path) -> None:
    assert_at_places(conformed(write(tmp_path, "shapefile", "point", prj=False), XY))


def test_srs_overrides_the_files_projection(tmp_path: Path) -> None:
    # The file says WGS84 but holds state plane numbers: the source's srs is believed.
    planar = sd.to_srs(PLACES, STATE_PLANE)
    records = [{"NUM": "1", "STREET": "Main St"}] * 3
    path = sd.write_ogr(tmp_path / "wrong" / "a.gpkg", "GPKG", records,
                        [shapely.Point(p) for p in planar], crs="EPSG:4326")
    assert_at_places(conformed(Layer(path, "gpkg"), {**XY, "srs": STATE_PLANE}))


@pytest.mark.parametrize(("lon", "lat"), [("x", "y"), ("X", "y")])
def test_any_case(tmp_path: Path, lon: str, lat: str) -> None:
    table = conformed(write(tmp_path, "geojson", "point"), {**XY, "lon": lon, "lat": lat})
    assert_at_places(table)


@pytest.mark.parametrize("fmt", ["shapefile", "geojson", "gpkg"])
def test_a_real_attribute_of_that_name_wins(tmp_path: Path, fmt: str) -> None:
    # The attributes put each address one place further along than its geometry does.
    shifted = PLACES[1:] + PLACES[:1]
    records = [{"NUM": "1", "STREET": "Main St", "x": str(lon), "Y": str(lat)}
               for lon, lat in shifted]
    table = conformed(write(tmp_path, fmt, "point", records=records), XY)
    assert_at_places(table, shifted)


def test_other_specs_read_the_coordinates_as_text_in_the_files_crs(tmp_path: Path) -> None:
    layer = write(tmp_path, "shapefile", "point", crs=STATE_PLANE)
    table = conformed(layer, {**XY, "id": {"function": "join", "fields": ["X", "Y"],
                                          "separator": " "}})
    assert_at_places(table)
    planar = sd.to_srs(PLACES, STATE_PLANE)
    ids = [tuple(float(v) for v in text.split()) for text in table["id"].to_pylist()]
    for (x, y), (want_x, want_y) in zip(ids, planar, strict=True):
        assert abs(x - want_x) < 1e-6 and abs(y - want_y) < 1e-6


def test_lon_from_x_and_lat_from_an_attribute(tmp_path: Path) -> None:
    records = [{"NUM": "1", "STREET": "Main St", "LATITUDE": str(lat)} for _, lat in PLACES]
    table = conformed(write(tmp_path, "geojson", "point", records=records),
                      {**XY, "lat": "LATITUDE"})
    assert_at_places(table)


def test_a_feature_without_geometry_is_dropped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "a.geojson"
    path.write_text(
        '{"type": "FeatureCollection", "features": ['
        '{"type": "Feature", "properties": {"NUM": "1", "STREET": "A"}, "geometry": null},'
        '{"type": "Feature", "properties": {"NUM": "2", "STREET": "B"},'
        ' "geometry": {"type": "Point", "coordinates": [-100.4661, 38.4817]}}]}'
    )
    conform = {"format": "geojson", **XY}
    with open_reader(path, conform) as reader:
        conformer = Conformer("addresses", conform, reader.fields, reader.crs,
                              has_geometry=reader.geometry_type is not None)
        table = pa.Table.from_batches([conformer.conform(b) for b in reader.batches()])
    assert table["number"].to_pylist() == ["2"]
    assert conformer.dropped_rows == 1


def test_csv_has_no_geometry_to_take_x_from(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("NUM,STREET\n1,A\n")
    conform = {"format": "csv", **XY}
    with open_reader(path, conform) as reader, pytest.raises(ConformError) as caught:
        Conformer("addresses", conform, reader.fields, reader.crs, has_geometry=False)
    assert caught.value.key == "lon"
    assert "conform names field 'X', which the source does not have" in str(caught.value)

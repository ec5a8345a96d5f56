"""Made-up data of the right shape for the real OpenAddresses sources in tests/fixtures/oa-sources.

Everything here builds bytes the way the providers publish them: CSV in the source's encoding
and delimiter, shapefiles / FileGDB / GML / GeoJSON written through GDAL (pyogrio), zip and
gzip containers with the member paths the source's ``file`` names, and Esri JSON features for
the fake ArcGIS server.

Coordinates start from known longitude/latitude (WGS84) and are projected into the source's
``srs`` (or the file's own CRS) with pyproj, so a test can check that the run brings every
point back to where it started.
"""

from __future__ import annotations

import csv
import gzip
import io
import warnings
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyproj
import shapely
from pyogrio.raw import write as ogr_write
from shapely.geometry.base import BaseGeometry

LonLat = tuple[float, float]


# --- coordinates ------------------------------------------------------------------------------


def to_srs(points: Sequence[LonLat], srs: str) -> list[tuple[float, float]]:
    """Known WGS84 lon/lat to ``srs`` (x = easting / longitude first, as sources write them)."""
    transformer = pyproj.Transformer.from_crs("EPSG:4326", srs, always_xy=True)
    xs, ys = transformer.transform([p[0] for p in points], [p[1] for p in points])
    return list(zip(np.atleast_1d(xs).tolist(), np.atleast_1d(ys).tolist(), strict=True))


def from_srs(points: Sequence[tuple[float, float]], srs: str) -> list[LonLat]:
    transformer = pyproj.Transformer.from_crs(srs, "EPSG:4326", always_xy=True)
    xs, ys = transformer.transform([p[0] for p in points], [p[1] for p in points])
    return list(zip(np.atleast_1d(xs).tolist(), np.atleast_1d(ys).tolist(), strict=True))


def near(origin: LonLat, count: int, step: float = 0.001) -> list[LonLat]:
    """``count`` distinct points a little east and north of ``origin``."""
    return [(round(origin[0] + i * step, 7), round(origin[1] + i * step / 2, 7))
            for i in range(count)]


def square(center: LonLat, half: float) -> shapely.Polygon:
    """An axis-aligned square (counter-clockwise) around ``center``; its point on surface is
    ``center`` itself (GEOS takes the middle of the widest interior run on the middle line)."""
    x, y = center
    return shapely.Polygon([(x - half, y - half), (x + half, y - half), (x + half, y + half),
                            (x - half, y + half), (x - half, y - half)])


def transform_geometry(geometry: BaseGeometry, srs: str) -> BaseGeometry:
    transformer = pyproj.Transformer.from_crs("EPSG:4326", srs, always_xy=True)

    def apply(coords: np.ndarray) -> np.ndarray:
        x, y = transformer.transform(coords[:, 0], coords[:, 1])
        return np.column_stack([x, y])

    return shapely.transform(geometry, apply)


# --- containers -------------------------------------------------------------------------------


def csv_bytes(
    header: Sequence[str] | None,
    rows: Iterable[Sequence[Any]],
    *,
    delimiter: str = ",",
    encoding: str = "utf-8",
    quote_all: bool = False,
) -> bytes:
    """A delimited file with CRLF line ends, in ``encoding`` (``header`` None: no header row)."""
    out = io.StringIO(newline="")
    writer = csv.writer(out, delimiter=delimiter, lineterminator="\r\n",
                        quoting=csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL)
    if header is not None:
        writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return out.getvalue().encode(encoding)


def zip_bytes(members: Mapping[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def zip_folder(folder: Path, prefix: str = "") -> dict[str, bytes]:
    """Every file under ``folder`` as zip members named ``prefix`` + relative path."""
    return {
        prefix + path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


# --- OGR files --------------------------------------------------------------------------------


def write_ogr(
    path: Path,
    driver: str,
    records: Sequence[Mapping[str, Any]],
    geometries: Sequence[BaseGeometry],
    *,
    crs: str,
    layer: str | None = None,
    types: Mapping[str, str] | None = None,
    encoding: str | None = None,
) -> Path:
    """Write features with GDAL. ``types`` maps a field to ``int``/``float``/``str`` (default
    ``str``); ``None`` values are written as nulls (empty for strings in a dbf). ``encoding``
    is the shapefile's dbf encoding (GDAL also writes it to a .cpg)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(records[0]) if records else []
    types = types or {}
    field_data = []
    for name in names:
        kind = types.get(name, "str")
        values = [record[name] for record in records]
        if kind == "int":
            field_data.append(np.array(values, dtype=np.int64))
        elif kind == "float":
            floats = [np.nan if v is None else v for v in values]
            field_data.append(np.array(floats, dtype=np.float64))
        else:
            field_data.append(np.array(values, dtype=object))
    wkb = np.array(shapely.to_wkb(list(geometries)), dtype=object)
    geometry_type = geometries[0].geom_type if geometries else "Unknown"
    with warnings.catch_warnings():
        # GDAL names the replacement of a deprecated EPSG code (3359 → 3404) in the .prj;
        # the source's own srs is what the run must use, so that is fine here.
        warnings.filterwarnings("ignore", message="CRS EPSG:.* is deprecated")
        warnings.filterwarnings("ignore", message=".* will be written as a Float64")
        ogr_write(
            str(path), wkb, field_data, names, layer=layer, driver=driver,
            geometry_type=geometry_type, crs=crs, encoding=encoding,
        )
    return path


# --- Esri JSON ----------------------------------------------------------------------------------

OID = "OBJECTID"


def esri_point(oid: int, lon: float, lat: float, **attributes: Any) -> dict[str, Any]:
    return {"attributes": {OID: oid, **attributes}, "geometry": {"x": lon, "y": lat}}


def esri_polygon(oid: int, polygon: shapely.Polygon, **attributes: Any) -> dict[str, Any]:
    """Esri rings: outer rings clockwise, holes counter-clockwise (Esri's convention)."""
    oriented = shapely.geometry.polygon.orient(polygon, sign=-1.0)
    rings = [oriented.exterior, *oriented.interiors]
    return {"attributes": {OID: oid, **attributes},
            "geometry": {"rings": [[list(p) for p in ring.coords] for ring in rings]}}


def esri_polyline(
    oid: int, line: shapely.LineString | shapely.MultiLineString, **attributes: Any
) -> dict[str, Any]:
    parts = line.geoms if isinstance(line, shapely.MultiLineString) else [line]
    return {"attributes": {OID: oid, **attributes},
            "geometry": {"paths": [[list(p) for p in part.coords] for part in parts]}}


def geojson_bytes(
    records: Sequence[Mapping[str, Any]], geometries: Sequence[BaseGeometry]
) -> bytes:
    """A GeoJSON FeatureCollection (RFC 7946, so lon/lat) written by hand: exact numbers."""
    import json

    features = [
        {"type": "Feature", "properties": dict(record),
         "geometry": json.loads(shapely.to_geojson(geometry))}
        for record, geometry in zip(records, geometries, strict=True)
    ]
    return json.dumps({"type": "FeatureCollection", "features": features},
                      ensure_ascii=False).encode("utf-8")

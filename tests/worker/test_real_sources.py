"""The 24 real OpenAddresses sources of tests/fixtures/oa-sources, end to end, on made-up data.

Each case takes a real source file unchanged except its ``data`` URL, which points at a server
on 127.0.0.1 (``DataServer`` for http, ``FakeArcGIS`` for ESRI, ``FtpServer`` for ftp) serving
made-up data of the right shape (``tests/support/sourcedata.py``): the format, container,
member path, encoding, delimiter and CRS the source says. The run goes through the worker's own
code (``run_entry`` in-process; ``run_isolated`` or the ``oa-machine process-one`` command for a
few) and the test reads the outputs: ``out.csv`` / ``out.geojson`` rows, geometry,
``index.json`` fields and ``sample.json``.

Expected values are worked out by hand from each source's conform spec and the reference
Machine's rules (written next to the rows), never by calling the conform functions. Coordinates
start as known WGS84 lon/lat, are projected into the source's CRS by the generator, and must
come back to within 1e-6 degrees; two rows are checked against coordinates published with the
projection's definition (EPSG:5179's natural origin, UTM 32N's central meridian).

The made-up data carries the wrinkles real downloads have: a byte-order mark, a zip member in
a top folder or in capitals, FileGDB doubles for house numbers, ESRI features without geometry,
a server without pagination or spelling fields in capitals, a parcel with a hole, a two-part
centerline, a redirect to a file store, a .gz the client already inflated, a dbf without code
page.

The second half holds the bad inputs from the product issue: 404, a 500 then success, an idle
connection, a truncated zip, a zip bomb, a path-traversal member, an invalid source JSON, an
unknown format, CSV rows of the wrong width, a 10 MB field and a catastrophic regular
expression (``(a+)+$`` itself runs on RE2 in linear time; the same pattern behind a look-ahead
goes to Python's ``re`` and is stopped by the run's time limit).
"""

from __future__ import annotations

import asyncio
import csv
import functools
import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyproj
import pytest
import shapely
import shapely.affinity
from shapely.geometry.base import BaseGeometry
from structlog.testing import capture_logs

from services.worker import run as run_module
from services.worker.isolation import Limits, RunRequest, run_isolated
from services.worker.run import run_entry
from services.worker.sources.fetch import fetch
from services.worker.sources.http import Retry, Timeouts
from services.worker.state import RunState
from shared.sources import load_source
from tests.support import sourcedata as sd
from tests.support.arcgis import FakeArcGIS, FakeLayer
from tests.support.dataserver import DataServer
from tests.support.ftpserver import FtpServer

SOURCES = Path(__file__).resolve().parents[1] / "fixtures" / "oa-sources"
OA_MACHINE = Path(sys.executable).with_name("oa-machine")
ADDRESS_ATTRIBUTES = ("number", "street", "unit", "city", "district", "region", "postcode", "id",
                      "accuracy")
CSV_COLUMNS = {"number": "NUMBER", "street": "STREET", "unit": "UNIT", "city": "CITY",
               "district": "DISTRICT", "region": "REGION", "postcode": "POSTCODE", "id": "ID"}
TOLERANCE_DEG = 1e-6


# --- servers and running ----------------------------------------------------------------------


@dataclass
class Servers:
    http: DataServer
    arcgis: FakeArcGIS
    ftp: FtpServer
    ftp_root: Path
    scratch: Path


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    ftp_root = tmp_path_factory.mktemp("ftp-root")
    with DataServer().running() as http, FakeArcGIS().running() as arcgis, \
            FtpServer(ftp_root) as ftp:
        yield Servers(http, arcgis, ftp, ftp_root, tmp_path_factory.mktemp("scratch"))


def real_source(path: str) -> dict[str, Any]:
    return json.loads((SOURCES / f"{path}.json").read_text())


def with_data_url(source: dict[str, Any], layer: str, entry: str, url: str) -> dict[str, Any]:
    """The source with only ``data`` of one entry rewritten, validated like any source."""
    source = json.loads(json.dumps(source))
    matches = [e for e in source["layers"][layer] if e.get("name") == entry]
    assert len(matches) == 1, f"{layer}/{entry} not in source"
    matches[0]["data"] = url
    return load_source(json.dumps(source), path="test")


def request_for(source: dict[str, Any], path: str, layer: str, entry: str, tmp: Path,
                **options: Any) -> RunRequest:
    return RunRequest(
        source=source, source_path=path, layer=layer, entry_name=entry,
        outdir=str(tmp / "out"), workdir=str(tmp / "work"), allow_private=True, **options,
    )


def run_in_process(request: RunRequest) -> RunState:
    Path(request.outdir).mkdir(parents=True, exist_ok=True)
    state = run_entry(request)
    state.write(Path(request.outdir) / "index.json")
    return state


def run_in_child(request: RunRequest, timeout_s: float = 60.0) -> RunState:
    return asyncio.run(run_isolated(request, Limits(timeout_s, 2 * 1024**3)))


def run_cli(source: dict[str, Any], path: str, layer: str, entry: str, tmp: Path,
            env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``oa-machine process-one`` on the source written as ``.../sources/<path>.json``."""
    source_file = tmp / "sources" / f"{path}.json"
    source_file.parent.mkdir(parents=True, exist_ok=True)
    source_file.write_text(json.dumps(source, ensure_ascii=False))
    outdir = tmp / "out"
    done = subprocess.run(
        [str(OA_MACHINE), "process-one", str(source_file), str(outdir), "--layer", layer,
         "--name", entry],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "LOG_FORMAT": "json", **(env or {})},
        cwd=Path(__file__).resolve().parents[2],
    )
    return done, outdir


# --- the cases --------------------------------------------------------------------------------


@dataclass
class Expected:
    """What a case's run must produce."""

    url: str
    #: addresses: attribute values ("" when empty) plus lon/lat; other layers: attributes.
    rows: list[dict[str, Any]]
    #: other layers: one WGS84 geometry per row.
    shapes: list[BaseGeometry] = field(default_factory=list)
    geometry_type: str = "Point"
    dropped_rows: int = 0
    tests_passed: bool | None = None
    #: raw field names that sample.json's header must hold.
    sample_fields: tuple[str, ...] = ()
    check: Callable[[Servers, RunState, Path], None] | None = None


@dataclass(frozen=True)
class Case:
    path: str
    layer: str
    entry: str
    build: Callable[[Servers], Expected]
    mode: str = "entry"  # entry (run_entry), child (run_isolated), cli (process-one)

    @property
    def id(self) -> str:
        return f"{self.path}:{self.layer}:{self.entry}"


CASES: list[Case] = []


def case(path: str, layer: str = "addresses", entry: str | None = None, mode: str = "entry"
         ) -> Callable[[Callable[[Servers], Expected]], Callable[[Servers], Expected]]:
    def register(build: Callable[[Servers], Expected]) -> Callable[[Servers], Expected]:
        name = entry
        if name is None:
            entries = real_source(path)["layers"][layer]
            assert len(entries) == 1
            name = entries[0]["name"]
        CASES.append(Case(path, layer, name, build, mode))
        return build

    return register


def addr(lonlat: sd.LonLat, **attributes: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(ADDRESS_ATTRIBUTES, "")
    unknown = set(attributes) - set(ADDRESS_ATTRIBUTES)
    assert not unknown, unknown
    row.update(attributes)
    row["lon"], row["lat"] = lonlat
    return row


def esri_layer(servers: Servers, name: str, features: list[dict[str, Any]],
               geometry_type: str = "esriGeometryPoint", **quirks: Any) -> str:
    # A small page size makes every ESRI case page through the layer.
    return servers.arcgis.add_layer(
        name, FakeLayer(features=features, geometry_type=geometry_type, max_record_count=2,
                        **quirks))


# us/ks/lane_county: a plain CSV over http with lon/lat columns.
@case("us/ks/lane_county")
def lane_county(s: Servers) -> Expected:
    p = sd.near((-100.4668, 38.4819), 4)
    raw = [
        ("101", "N MAIN ST", "DIGHTON", "67839", *p[0]),
        (" 205 ", "E LONG ST ", "DIGHTON", "67839", *p[1]),  # trimmed
        ("12.0", "MAIN ST", "HEALY", "67850", *p[2]),  # a float column upstream: ".0" goes
        ("300", "NO COORDS RD", "DIGHTON", "67839", "", ""),  # no position: dropped
        ("7", "S 1ST ST", "DIGHTON", "67839", *p[3]),
    ]
    body = sd.csv_bytes(["NUM", "STR", "CITY", "ZIP", "LON", "LAT"], raw)
    return Expected(
        url=s.http.add("/cache/us-ks-lane_county.csv", body, content_type="text/csv"),
        rows=[
            addr(p[0], number="101", street="N MAIN ST", city="DIGHTON", postcode="67839"),
            addr(p[1], number="205", street="E LONG ST", city="DIGHTON", postcode="67839"),
            addr(p[2], number="12", street="MAIN ST", city="HEALY", postcode="67850"),
            addr(p[3], number="7", street="S 1ST ST", city="DIGHTON", postcode="67839"),
        ],
        dropped_rows=1,
        sample_fields=("NUM", "STR", "CITY", "ZIP", "LON", "LAT"),
    )


# ch/uri: CSV inside a zip, picked by `file` past a decoy; regexp with a look-behind (Python re).
@case("ch/uri", mode="child")
def uri(s: Servers) -> Expected:
    p = sd.near((8.6444, 46.8804), 4)
    header = ["gwr_egid", "hausnummer", "strassennamen", "ortschaft", "plz", "X", "Y"]
    raw = [
        ("1001", "12", "Gotthardstrasse", "Altdorf UR", "6460", *p[0]),
        ("1002", "3a", "Dorfstrasse", "SeedorfUR", "6462", *p[1]),
        ("1003", "5", "Axenstrasse", "Flüelen UR ", "6454", *p[2]),
        ("1004", "1", "Bahnhofstrasse", "Andermatt", "6490", *p[3]),
    ]
    decoy = sd.csv_bytes(header, [("9", "9", "Falsch", "Falsch", "0000", 8.0, 47.0)])
    # Written with a byte-order mark, as Windows tools do: "gwr_egid" must still resolve.
    body = sd.zip_bytes({"aaa-other.csv": decoy,
                         "ch-ur.csv": sd.csv_bytes(header, raw, encoding="utf-8-sig")})
    # city: group 1 of ^(.+?)(?:(?<=Seedorf)UR|\s+UR)?\s*$ (no replace: extract)
    return Expected(
        url=s.http.add("/cache/uploads/sergiyprotsiv/a24c45/ch-ur.csv.zip", body,
                       content_type="application/zip"),
        rows=[
            addr(p[0], id="1001", number="12", street="Gotthardstrasse", city="Altdorf",
                 postcode="6460"),
            addr(p[1], id="1002", number="3a", street="Dorfstrasse", city="Seedorf",
                 postcode="6462"),
            addr(p[2], id="1003", number="5", street="Axenstrasse", city="Flüelen",
                 postcode="6454"),
            addr(p[3], id="1004", number="1", street="Bahnhofstrasse", city="Andermatt",
                 postcode="6490"),
        ],
        sample_fields=tuple(header),
    )


# ca/qc/province: EPSG:4617 lat/lon columns; number = chain(format "$1 $2", regexp).
@case("ca/qc/province")
def quebec(s: Servers) -> Expected:
    p = sd.near((-71.2080, 46.8139), 6)
    xy = sd.to_srs(p, "EPSG:4617")
    header = ["id_adr", "numero_municipal", "numero_municipal_suffixe", "numero_unite",
              "odonyme_recompose_court", "nom_municipalite", "code_postal", "latitude",
              "longitude"]
    raw = [
        ("1", "123", "", "", "rue Saint-Jean", "Québec", "G1R 1P7"),
        ("2", "123", "A", "", "rue Saint-Jean", "Québec", "G1R 1P7"),
        ("3", "45", "1/2", "2", "avenue Cartier", "Québec", "G1R 2S3"),
        ("4", "12.0", "", "", "chemin Sainte-Foy", "Québec", "G1S 2J1"),
        ("5", "7", "-9", "", "rue de la Couronne", "Québec", "G1K 6E1"),
        ("6", "88", "&", "", "boulevard Laurier", "Québec", "G1V 2M2"),
    ]
    rows = [(*r, y, x) for r, (x, y) in zip(raw, xy, strict=True)]
    body = sd.zip_bytes({"RQA_CSV/Adresses.csv": sd.csv_bytes(header, rows)})
    # format "$1 $2": the space only when both have a value; a value loses a trailing ".0".
    # regexp: $1 the number, then $2 " 1/2" kept with its space, $3 a letter suffix glued on,
    # $4 a "-9" suffix glued on, "&" dropped.
    numbers = ["123", "123A", "45 1/2", "12", "7-9", "88"]
    return Expected(
        url=s.http.add("/diffusion/RGQ/Vectoriel/Theme/Local/RQA/CSV/RQA_CSV.zip", body),
        rows=[
            addr(p[i], number=numbers[i], street=raw[i][4], city="Québec", postcode=raw[i][6],
                 unit=raw[i][3])
            for i in range(6)
        ],
        sample_fields=tuple(header),
    )


# fr/01/statewide addresses: gzip CSV, ";", join with "", map to accuracy with else.
@case("fr/01/statewide")
def ban(s: Servers) -> Expected:
    p = sd.near((5.2258, 46.2052), 6)
    l93 = sd.to_srs(p, "EPSG:2154")
    header = ["id", "numero", "rep", "nom_voie", "code_postal", "code_insee", "nom_commune",
              "x", "y", "lon", "lat", "type_position"]
    bourg = ("Rue de la République", "01000", "01053", "Bourg-en-Bresse")
    amb = ("Rue du Château", "01500", "01004", "Ambérieu-en-Bugey")
    raw = [
        ("01053_0100_00012", "12", "bis", *bourg, "entrée"),
        ("01053_0100_00003", "3", "", *bourg, "bâtiment"),
        ("01053_0200_00007", "7", "ter", *bourg, "cage d’escalier"),
        ("01004_0050_00001", "1", "", *amb, "segment"),
        ("01004_0050_00005", "5", "B", *amb, "inconnue"),
        ("01004_0050_00009", "9", "", *amb, "service technique"),
    ]
    rows = [(*r[:7], round(x, 2), round(y, 2), lon, lat, r[7])
            for r, (x, y), (lon, lat) in zip(raw, l93, p, strict=True)]
    body = sd.gzip_bytes(sd.csv_bytes(header, rows, delimiter=";"))
    accuracy = ["2", "1", "2", "3", "5", "5"]  # entrée, bâtiment, cage, segment, else, service
    numbers = ["12bis", "3", "7ter", "1", "5B", "9"]
    return Expected(
        url=s.http.add("/data/ban/adresses/latest/csv/adresses-01.csv.gz", body,
                       content_type="application/gzip"),
        rows=[
            addr(p[i], id=raw[i][0], number=numbers[i], street=raw[i][3], postcode=raw[i][4],
                 city=raw[i][6], accuracy=accuracy[i])
            for i in range(6)
        ],
        sample_fields=tuple(header),
    )


def _parcel_shapes(origin: sd.LonLat, count: int, half: float = 0.0002) -> list[shapely.Polygon]:
    return [sd.square(c, half) for c in sd.near(origin, count)]


# fr/01/statewide parcels: gzip GeoJSON polygons (one a MultiPolygon), pid from "id".
@case("fr/01/statewide", layer="parcels")
def cadastre_parcels(s: Servers) -> Expected:
    squares = _parcel_shapes((5.2258, 46.2052), 3)
    shapes: list[BaseGeometry] = [
        squares[0], squares[1],
        shapely.MultiPolygon([squares[2], sd.square((5.2358, 46.2152), 0.0001)]),
    ]
    records = [{"id": f"010530000A00{n}", "commune": "01053", "prefixe": "000", "section": "A",
                "numero": str(n), "contenance": 500 + n} for n in (12, 13, 14)]
    body = sd.gzip_bytes(sd.geojson_bytes(records, shapes))
    return Expected(
        url=s.http.add("/data/etalab-cadastre/latest/geojson/departements/01/"
                       "cadastre-01-parcelles.json.gz", body),
        rows=[{"pid": r["id"]} for r in records], shapes=shapes,
        geometry_type="MultiPolygon", sample_fields=("id", "commune", "contenance"),
    )


# fr/01/statewide buildings: gzip GeoJSON multipolygons and no attributes in the conform.
@case("fr/01/statewide", layer="buildings")
def cadastre_buildings(s: Servers) -> Expected:
    shapes: list[BaseGeometry] = [
        shapely.MultiPolygon([sq]) for sq in _parcel_shapes((5.2260, 46.2050), 3, 0.00005)
    ]
    records = [{"type": "01", "nom": None, "commune": "01053"} for _ in shapes]
    body = sd.gzip_bytes(sd.geojson_bytes(records, shapes))
    return Expected(
        url=s.http.add("/data/etalab-cadastre/latest/geojson/departements/01/"
                       "cadastre-01-batiments.json.gz", body),
        rows=[{"id": "", "height": "", "levels": ""} for _ in shapes], shapes=shapes,
        geometry_type="MultiPolygon", sample_fields=("type", "commune"),
    )


#: EPSG:5179 (Korea 2000 / Unified CS): natural origin 38°N 127°30'E at E 1,000,000 N 2,000,000,
#: as the EPSG dataset publishes it; the run must put that point there without pyproj's help.
KOREA_ORIGIN_XY = (1000000.0, 2000000.0)
KOREA_ORIGIN_LONLAT = (127.5, 38.0)


# kr/11/provincewide: no header row, CP949, "|" delimiter, EPSG:5179, a `file` with .txt.
@case("kr/11/provincewide", mode="child")
def seoul(s: Servers) -> Expected:
    p = sd.near((126.9780, 37.5665), 3)
    xy = sd.to_srs(p, "EPSG:5179")
    base = [
        ("11110", "1001", "1111010100", "서울특별시", "종로구", "청운동", "111103100012",
         "자하문로", "0", "94", "0", "", "03047", "주택", "0", "청운효자동"),
        ("11110", "1002", "1111011500", "서울특별시", "종로구", "세종로", "111103100014",
         "세종대로", "0", "175", "0", "세종문화회관", "03172", "문화", "0", "사직동"),
        ("11680", "2001", "1168010100", "서울특별시", "강남구", "역삼동", "116803122010",
         "테헤란로", "0", "152", "1", "", "06236", "업무", "0", "역삼1동"),
    ]
    numbers = ["94", "175", "152-1"]
    lines = [(*b, round(x, 6), round(y, 6), n, "")
             for b, (x, y), n in zip(base, xy, numbers, strict=True)]
    origin = ("11110", "9999", "1111099999", "서울특별시", "종로구", "원점동", "111109999999",
              "원점로", "0", "1", "0", "", "00000", "기타", "0", "원점동",
              *KOREA_ORIGIN_XY, "1", "")
    lines.append(origin)
    body = sd.csv_bytes(None, lines, delimiter="|", encoding="cp949")
    decoy = sd.csv_bytes(None, [("x",) * 20], delimiter="|", encoding="cp949")
    # Inside a top folder, as zips made from a folder are: `file` still names the member.
    archive = sd.zip_bytes({"korea-feb2017/entrc_busan.txt": decoy,
                            "korea-feb2017/entrc_seoul.txt": body})
    rows = [
        addr(p[i], number=numbers[i], street=base[i][7], postcode=base[i][12],
             district=base[i][5], city=base[i][4], region=base[i][3],
             id=f"{base[i][2]}-{base[i][1]}")
        for i in range(3)
    ]
    rows.append(addr(KOREA_ORIGIN_LONLAT, number="1", street="원점로", postcode="00000",
                     district="원점동", city="종로구", region="서울특별시",
                     id="1111099999-9999"))
    return Expected(
        url=s.http.add("/cache/uploads/sergiyprotsiv/40a526/korea-feb2017.zip", archive),
        rows=rows, sample_fields=("COLUMN1", "COLUMN19", "COLUMN20"),
    )


# jp/tokyo: SHIFT_JISX0213 (a character outside Shift_JIS proper), Japanese field names,
# EPSG:4612, number = join of two fields with "-".
@case("jp/tokyo")
def tokyo(s: Servers) -> Expected:
    p = sd.near((139.7671, 35.6812), 3)
    jgd = sd.to_srs(p, "EPSG:4612")
    plane = sd.to_srs(p, "EPSG:2451")
    header = ["都道府県名", "市区町村名", "大字・丁目名", "小字・通称名", "街区符号・地番",
              "座標系番号", "Ｘ座標", "Ｙ座標", "緯度", "経度", "住居表示フラグ", "代表フラグ",
              "更新前履歴フラグ", "更新後履歴フラグ"]
    raw = [
        ("東京都", "千代田区", "丸の内一丁目", "", "1", "9"),
        ("東京都", "千代田区", "丸の内二丁目", "", "7", "9"),
        ("東京都", "大田区", "山﨑町", "", "23", "9"),
    ]
    rows = [(*r, round(py, 1), round(px, 1), lat, lon, "1", "1", "0", "0")
            for r, (lon, lat), (px, py) in zip(raw, jgd, plane, strict=True)]
    body = sd.csv_bytes(header, rows, encoding="shift_jisx0213", quote_all=True)
    return Expected(
        url=s.http.add("/isj/dls/data/24.0a/13000-24.0a.zip",
                       sd.zip_bytes({"13000_2024.csv": body})),
        rows=[addr(p[i], number=f"{raw[i][4]}-{raw[i][5]}", street=raw[i][2], city=raw[i][1],
                   region=raw[i][0]) for i in range(3)],
        sample_fields=("都道府県名", "街区符号・地番", "経度"),
    )


def _shapefile_members(s: Servers, name: str, stem: str, records: list[dict[str, Any]],
                       geoms: list[BaseGeometry], crs: str, prefix: str = "",
                       types: dict[str, str] | None = None,
                       latin1_without_cpg: bool = False) -> dict[str, bytes]:
    folder = s.scratch / name
    sd.write_ogr(folder / f"{stem}.shp", "ESRI Shapefile", records, geoms, crs=crs, types=types,
                 encoding="ISO-8859-1" if latin1_without_cpg else None)
    if latin1_without_cpg:
        # Many county exports: a Latin-1 dbf, no .cpg, no code page in the dbf header.
        (folder / f"{stem}.cpg").unlink()
    return sd.zip_folder(folder, prefix)


# us/nc/anson: a shapefile at a nested `file` path (911/address.shp) among decoys; EPSG:3359.
@case("us/nc/anson")
def anson(s: Servers) -> Expected:
    p = sd.near((-80.0767, 34.9682), 3)
    srs = "EPSG:3359"
    records = [
        {"NUMBER": 120, "STREET": "E WADE ST", "APT_NUMBER": "", "COMMUNITY": "WADESBORO"},
        {"NUMBER": 305, "STREET": "US HWY 74 W", "APT_NUMBER": "B", "COMMUNITY": "WADESBORO"},
        {"NUMBER": 17, "STREET": "MORVEN RD", "APT_NUMBER": "", "COMMUNITY": "MORVEN"},
    ]
    points = [shapely.Point(xy) for xy in sd.to_srs(p, srs)]
    # The county's export spells the file in capitals; `file` matches case-insensitively.
    members = _shapefile_members(s, "anson", "ADDRESS", records, points, srs, "911/",
                                 {"NUMBER": "int"})
    decoy = [{"NUMBER": 1, "STREET": "DECOY", "APT_NUMBER": "", "COMMUNITY": "X"}]
    members.update(_shapefile_members(s, "anson-old", "address", decoy, points[:1], srs,
                                      "backup/", {"NUMBER": "int"}))
    members.update(_shapefile_members(s, "anson-roads", "roads", decoy, points[:1], srs, "911/",
                                      {"NUMBER": "int"}))
    return Expected(
        url=s.http.add("/Portals/2/records/gisdaily.zip", sd.zip_bytes(members)),
        rows=[addr(p[i], number=str(r["NUMBER"]), street=r["STREET"], unit=r["APT_NUMBER"],
                   city=r["COMMUNITY"]) for i, r in enumerate(records)],
        sample_fields=("NUMBER", "STREET", "APT_NUMBER", "COMMUNITY"),
    )


# us/nc/stanly: ftp, a path with spaces, a shapefile whose CRS comes from its .prj (EPSG:2264).
@case("us/nc/stanly", mode="cli")
def stanly(s: Servers) -> Expected:
    p = sd.near((-80.2001, 35.3501), 3)
    records = [
        {"ADDRNUM": 144, "Apartment": "", "ROAD_PRE": "N", "ROAD_NAME": "SECOND",
         "ROAD_TYPE": "ST", "ROAD_SUF": "", "City": "ALBEMARLE"},
        {"ADDRNUM": 1010, "Apartment": "2B", "ROAD_PRE": "", "ROAD_NAME": "NC 24-27",
         "ROAD_TYPE": "HWY", "ROAD_SUF": "E", "City": "ALBEMARLE"},
        {"ADDRNUM": 55, "Apartment": "", "ROAD_PRE": "W", "ROAD_NAME": "MAIN",
         "ROAD_TYPE": "ST", "ROAD_SUF": "", "City": "NORWOOD"},
    ]
    points = [shapely.Point(xy) for xy in sd.to_srs(p, "EPSG:2264")]
    members = _shapefile_members(s, "stanly", "address_points", records, points, "EPSG:2264",
                                 types={"ADDRNUM": "int"})
    target = s.ftp_root / "gisdata" / "Layer Zip Files" / "address_points.zip"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(sd.zip_bytes(members))
    streets = ["N SECOND ST", "NC 24-27 HWY E", "W MAIN ST"]  # empty parts skipped
    return Expected(
        url=f"ftp://127.0.0.1:{s.ftp.port}/gisdata/Layer Zip Files/address_points.zip",
        rows=[addr(p[i], number=str(r["ADDRNUM"]), unit=r["Apartment"], street=streets[i],
                   city=r["City"]) for i, r in enumerate(records)],
        sample_fields=("ADDRNUM", "ROAD_NAME", "City"),
    )


# us/nc/davie: shapefile-polygon; the address point is the polygon's point on surface.
@case("us/nc/davie")
def davie(s: Servers) -> Expected:
    p = sd.near((-80.5612, 35.8940), 3)
    srs = "EPSG:2264"
    records = [
        {"HSNM": 130, "PREDIR": "S", "STREET": "MAIN", "TYPE": "ST", "POSTDIR": "", "UNIT": ""},
        {"HSNM": 284, "PREDIR": "", "STREET": "SALISBURY", "TYPE": "ST", "POSTDIR": "",
         "UNIT": "A"},
        {"HSNM": 1180, "PREDIR": "", "STREET": "US 601", "TYPE": "HWY", "POSTDIR": "N",
         "UNIT": ""},
    ]
    # 20 ft squares around each projected point: the point on surface is the centre.
    squares = [sd.square(xy, 10.0) for xy in sd.to_srs(p, srs)]
    # An L-shaped lot: its centroid lies outside it, the address point must not.
    ox, oy = sd.to_srs([(-80.5700, 35.9000)], srs)[0]
    ell = shapely.Polygon([(ox, oy), (ox + 100, oy), (ox + 100, oy + 10), (ox + 10, oy + 10),
                           (ox + 10, oy + 100), (ox, oy + 100), (ox, oy)])
    assert not ell.contains(ell.centroid)
    records.append({"HSNM": 7, "PREDIR": "", "STREET": "CAÑON", "TYPE": "CT", "POSTDIR": "",
                    "UNIT": ""})
    members = _shapefile_members(s, "davie", "address", records, [*squares, ell], srs,
                                 types={"HSNM": "int"})
    inverse = pyproj.Transformer.from_crs(srs, "EPSG:4326", always_xy=True)
    ell_lonlat = shapely.transform(ell, lambda c: np.column_stack(inverse.transform(c[:, 0],
                                                                                    c[:, 1])))
    return Expected(
        url=s.http.add("/DavieGISweb/gisdata/address.zip", sd.zip_bytes(members)),
        rows=[
            addr(p[0], number="130", street="S MAIN ST"),
            addr(p[1], number="284", street="SALISBURY ST", unit="A"),
            addr(p[2], number="1180", street="US 601 HWY N"),
            {**addr((float("nan"), float("nan")), number="7", street="CAÑON CT"),
             "inside": ell_lonlat},
        ],
        sample_fields=("HSNM", "PREDIR", "STREET", "TYPE", "POSTDIR", "UNIT"),
    )


# us/or/jefferson: a FileGDB folder inside a zip (`file`) with two layers; `layer` picks one.
@case("us/or/jefferson", mode="cli")
def jefferson(s: Servers) -> Expected:
    p = sd.near((-121.1295, 44.6335), 3)
    srs = "EPSG:2992"
    records = [
        {"Number": 675, "Direction": "SW", "Name": "CULVER", "Suffix": "HWY", "City": "MADRAS",
         "ZIP": "97741"},
        {"Number": 98, "Direction": "", "Name": "D", "Suffix": "ST", "City": "MADRAS",
         "ZIP": "97741"},
        {"Number": 3120, "Direction": "NE", "Name": "JEFFERSON", "Suffix": "LN",
         "City": "CULVER", "ZIP": "97734"},
    ]
    gdb = s.scratch / "jefferson" / "Delivery" / "addresses_oregon.gdb"
    decoy = [{"Number": 1, "Direction": "", "Name": "WRONG", "Suffix": "RD", "City": "BEND",
              "ZIP": "97701"}]
    # The house numbers are doubles in this geodatabase: "675.0" must come out "675".
    sd.write_ogr(gdb, "OpenFileGDB", decoy, [shapely.Point(sd.to_srs([(-121.3, 44.05)], srs)[0])],
                 crs=srs, layer="Deschutes", types={"Number": "float"})
    sd.write_ogr(gdb, "OpenFileGDB", records, [shapely.Point(xy) for xy in sd.to_srs(p, srs)],
                 crs=srs, layer="Jefferson", types={"Number": "float"})
    members = sd.zip_folder(s.scratch / "jefferson")
    members["Delivery/README.txt"] = b"Oregon address points\n"
    return Expected(
        url=s.http.add("/cache/uploads/migurski/d5add2/oregon_state_addresses.zip",
                       sd.zip_bytes(members)),
        rows=[
            addr(p[0], number="675", street="SW CULVER HWY", city="MADRAS", postcode="97741"),
            addr(p[1], number="98", street="D ST", city="MADRAS", postcode="97741"),
            addr(p[2], number="3120", street="NE JEFFERSON LN", city="CULVER",
                 postcode="97734"),
        ],
        sample_fields=("Number", "Direction", "Name", "Suffix", "City", "ZIP"),
    )


#: UTM zone 32N's central meridian is 9°E: a point at easting 500,000 m lies on it exactly.
UTM32_CENTRAL_EASTING = 500000.0
UTM32_CENTRAL_LON = 9.0


# de/hh/statewide: GML (format xml) inside a zip, EPSG:25832, number = list of two fields.
@case("de/hh/statewide")
def hamburg(s: Servers) -> Expected:
    p = sd.near((9.9937, 53.5511), 3)
    srs = "EPSG:25832"
    records = [
        {"portsname": "Hamburg", "strname": "Rathausmarkt", "plz": "20095", "hausnr": "1",
         "zusatz": ""},
        {"portsname": "Hamburg", "strname": "Jungfernstieg", "plz": "20354", "hausnr": "7",
         "zusatz": "a"},
        {"portsname": "Hamburg", "strname": "Mönckebergstraße", "plz": "20095", "hausnr": "12",
         "zusatz": "b"},
        {"portsname": "Neuenfelde", "strname": "Nincoper Straße", "plz": "21129", "hausnr": "3",
         "zusatz": ""},
    ]
    xy = [*sd.to_srs(p, srs), (UTM32_CENTRAL_EASTING, 5934000.0)]
    folder = s.scratch / "hamburg"
    sd.write_ogr(folder / "ALKIS_Adressen_HH.gml", "GML", records,
                 [shapely.Point(c) for c in xy], crs=srs)
    # The first three come back to their known lon/lat; the fourth lies on 9°E exactly (its
    # latitude, which has no round published value, is pyproj's).
    meridian = (UTM32_CENTRAL_LON, sd.from_srs([xy[3]], srs)[0][1])
    points = [*p, meridian]
    return Expected(
        url=s.http.add("/opendata/ALKIS_Adressen/ALKIS_Adressen_HH_2026-07-03.zip",
                       sd.zip_bytes(sd.zip_folder(folder))),
        rows=[addr(points[i], city=r["portsname"], street=r["strname"], postcode=r["plz"],
                   number=f"{r['hausnr']} {r['zusatz']}".strip())
              for i, r in enumerate(records)],
        sample_fields=("portsname", "strname", "plz", "hausnr", "zusatz"),
    )


# us/al/washington: ESRI; prefixed_number and postfixed_street over one address field.
@case("us/al/washington")
def washington(s: Servers) -> Expected:
    p = sd.near((-88.2497, 31.4652), 7)
    addresses = ["123 MAIN ST", "45-A COUNTY RD 12", "123 1/2 ELM ST", "HWY 17 N",
                 "  9 OAK AVE ", "1600a PINE ST", "69-15 QUEENS BLVD"]
    features = [sd.esri_point(i + 1, *p[i], PhysAddr=a, PARCELNO=f"P{i}")
                for i, a in enumerate(addresses)]
    split = [("123", "MAIN ST"), ("45-A", "COUNTY RD 12"), ("123 1/2", "ELM ST"),
             ("", "HWY 17 N"), ("9", "OAK AVE"), ("1600a", "PINE ST"), ("69-15", "QUEENS BLVD")]
    return Expected(
        url=esri_layer(s, "al-washington", features),
        rows=[addr(p[i], number=n, street=st) for i, (n, st) in enumerate(split)],
        sample_fields=("PhysAddr",),
    )


# us/tx/city_of_mckinney: ESRI; postfixed_unit and postfixed_street with may_contain_units;
# inline acceptance tests.
@case("us/tx/city_of_mckinney", mode="child")
def mckinney(s: Servers) -> Expected:
    p = sd.near((-96.6153, 33.1972), 6)
    data = [
        ("1003 W LAMAR ST", "1003", "W LAMAR ST", ""),
        ("900 S TENNESSEE ST BLDG 11A", "900", "S TENNESSEE ST", "BLDG 11A"),
        ("5610 N MCDONALD ST STE C", "5610", "N MCDONALD ST", "STE C"),
        ("2200 W VIRGINIA PKWY # 4", "2200", "W VIRGINIA PKWY", "# 4"),
        ("100 E HUNT ST APT 5", "100", "E HUNT ST", "APT 5"),
        ("7 LOTUS LN", "7", "LOTUS LN", ""),  # LOT needs a space after it
    ]
    features = [sd.esri_point(i + 1, *p[i], SitusAdd=d[0], City="MCKINNEY")
                for i, d in enumerate(data)]
    return Expected(
        url=esri_layer(s, "tx-mckinney", features),
        rows=[addr(p[i], number=d[1], street=d[2], unit=d[3], city="MCKINNEY")
              for i, d in enumerate(data)],
        tests_passed=True, sample_fields=("SitusAdd", "City"),
    )


# us/co/yuma: ESRI; chains of postfixed_street and regexp for street, city and postcode.
@case("us/co/yuma")
def yuma(s: Servers) -> Expected:
    p = sd.near((-102.7177, 40.1222), 3)
    features = [
        sd.esri_point(1, *p[0], TSC_Site_Address="12345 COUNTY ROAD 45 YUMA 80759"),
        sd.esri_point(2, *p[1], TSC_Site_Address="410 S MAIN ST WRAY 80758"),
        sd.esri_point(3, *p[2], TSC_Site_Address="17 S MAIN ST"),
    ]
    return Expected(
        url=esri_layer(s, "co-yuma", features),
        rows=[
            addr(p[0], number="12345", street="COUNTY ROAD 45", city="YUMA", postcode="80759"),
            addr(p[1], number="410", street="S MAIN ST", city="WRAY", postcode="80758"),
            # No match: re.sub leaves the value as it is, in every chain (reference behaviour).
            addr(p[2], number="17", street="S MAIN ST", city="S MAIN ST", postcode="S MAIN ST"),
        ],
        sample_fields=("TSC_Site_Address",),
    )


def _effingham_layer(s: Servers) -> tuple[str, list[sd.LonLat], list[shapely.Polygon]]:
    p = sd.near((-88.5434, 39.1200), 4)
    squares = [sd.square(c, 0.0003) for c in p]
    data = [
        ("1201", "1201 N MAPLE ST EFFINGHAM IL 62401", "EFFINGHAM IL 62401"),
        ("305", "305 1/2 W JEFFERSON AVE EFFINGHAM IL 62401", "EFFINGHAM IL 62401"),
        ("14", "RR 2 BOX 14", "TEUTOPOLIS IL 62467-1234"),
        ("8", "8 S BANKER ST ALTAMONT IL 62411", "ALTAMONT IL 62411"),
    ]
    features = [
        sd.esri_polygon(i + 1, squares[i], SiteHouse=d[0], SiteAddress=d[1], SiteCSZ=d[2],
                        PinFormatted=f"05-12-345-00{i + 1}")
        for i, d in enumerate(data)
    ]
    if "il-effingham" not in s.arcgis.layers:
        esri_layer(s, "il-effingham", features, "esriGeometryPolygon")
    return s.arcgis.layer_url("il-effingham"), p, squares


# us/il/effingham addresses: ESRI parcels (polygons → point on surface); chain of
# remove_postfix + regexp; regexp extract city/postcode; constant region.
@case("us/il/effingham")
def effingham(s: Servers) -> Expected:
    url, p, _ = _effingham_layer(s)
    return Expected(
        url=url,
        rows=[
            addr(p[0], number="1201", street="N MAPLE ST", city="EFFINGHAM", region="IL",
                 postcode="62401"),
            addr(p[1], number="305", street="W JEFFERSON AVE", city="EFFINGHAM", region="IL",
                 postcode="62401"),
            # The postfix is not at the end: the address stays whole and has no number to cut.
            addr(p[2], number="14", street="RR 2 BOX 14", city="TEUTOPOLIS", region="IL",
                 postcode="62467-1234"),
            addr(p[3], number="8", street="S BANKER ST", city="ALTAMONT", region="IL",
                 postcode="62411"),
        ],
        sample_fields=("SiteHouse", "SiteAddress", "SiteCSZ"),
    )


# us/il/effingham parcels: the same ESRI layer, polygons kept whole.
@case("us/il/effingham", layer="parcels")
def effingham_parcels(s: Servers) -> Expected:
    url, _, squares = _effingham_layer(s)
    return Expected(url=url, rows=[{"pid": f"05-12-345-00{i + 1}"} for i in range(4)],
                    shapes=list(squares), geometry_type="Polygon", sample_fields=("PinFormatted",))


# be/wal/bosa-region-wallonia-fr addresses: zip CSV; first_non_empty, join ":", accuracy 3.
@case("be/wal/bosa-region-wallonia-fr")
def wallonia(s: Servers) -> Expected:
    p = sd.near((4.8719, 50.4674), 3)
    lambert = sd.to_srs(p, "EPSG:31370")
    header = ["EPSG:31370_x", "EPSG:31370_y", "EPSG:4326_lat", "EPSG:4326_lon", "address_id",
              "box_number", "house_number", "municipality_id", "municipality_name_de",
              "municipality_name_fr", "postcode", "streetname_de", "streetname_fr",
              "region_code", "status"]
    raw = [
        ("1001", "", "12", "92094", "Namür", "Namur", "5000", "", "Rue de Fer"),
        ("1002", "2", "5", "63023", "Eupen", "Eupen", "4700", "Aachener Straße", ""),
        ("1003", "", "7", "63023", "Eupen", "Eupen", "4700", "Kirchstraße", "  "),
    ]
    rows = [(round(x, 2), round(y, 2), lat, lon, *r, "BE-WAL", "current")
            for r, (x, y), (lon, lat) in zip(raw, lambert, p, strict=True)]
    body = sd.zip_bytes({"openaddress-bewal.csv": sd.csv_bytes(header, rows)})
    streets = ["Rue de Fer", "Aachener Straße", "Kirchstraße"]  # blank "  " counts as empty
    return Expected(
        url=s.http.add("/download/best/openaddress-bewal.zip", body),
        rows=[addr(p[i], number=r[2], street=streets[i], city=r[5], postcode=r[6],
                   id=f"BE-WAL:{r[0]}", unit=r[1], accuracy="3") for i, r in enumerate(raw)],
        sample_fields=("EPSG:4326_lat", "EPSG:4326_lon", "address_id"),
    )


# be/wal parcels: zip shapefile in EPSG:3812 (from its .prj), reprojected whole.
@case("be/wal/bosa-region-wallonia-fr", layer="parcels")
def wallonia_parcels(s: Servers) -> Expected:
    shapes = _parcel_shapes((4.8719, 50.4674), 3)
    keys = ["92094A0123/00B000", "92094A0124/00_000", "63023C0456/02A000"]
    members = _shapefile_members(
        s, "bewal-parcels", "Bpn_CaPa_WAL", [{"CaPaKey": k, "CaPaTy": "PR"} for k in keys],
        [sd.transform_geometry(g, "EPSG:3812") for g in shapes], "EPSG:3812")
    return Expected(
        url=s.http.add("/download/datasets/1d797df0-c988-11ed-abc3-0050569393d1_20250504_shp_"
                       "3812_03000.zip", sd.zip_bytes(members)),
        rows=[{"pid": k} for k in keys], shapes=list(shapes), geometry_type="Polygon",
        sample_fields=("CaPaKey",),
    )


# cn/42/wuhan: zip GeoJSON; format "$1号$2栋" with the reference's rules for empty fields.
@case("cn/42/wuhan")
def wuhan(s: Servers) -> Expected:
    p = sd.near((114.3055, 30.5928), 5)
    records: list[dict[str, Any]] = [
        {"MPH": 12.0, "LPH": "3", "JLXMC": "中山大道", "SSQ": "江汉区"},
        {"MPH": 8, "LPH": "", "JLXMC": "解放大道", "SSQ": "硚口区"},
        {"MPH": 15.0, "LPH": "2", "JLXMC": "沿江大道", "SSQ": "江岸区"},
        {"MPH": None, "LPH": "2", "JLXMC": "沿江大道", "SSQ": "江岸区"},
        {"MPH": None, "LPH": "", "JLXMC": "黄鹤楼路", "SSQ": "武昌区"},
    ]
    body = sd.geojson_bytes(records, [shapely.Point(c) for c in p])
    # MPH is a Real column ("12.0"): format drops the ".0". The text after the last
    # placeholder is written whenever any field has a value; "号" only between two values.
    numbers = ["12号3栋", "8栋", "15号2栋", "2栋", ""]
    return Expected(
        url=s.http.add("/cache/uploads/thatdatabaseguy/9810d4/wuhan.geojson.zip",
                       sd.zip_bytes({"wuhan.geojson": body})),
        rows=[addr(p[i], number=numbers[i], street=r["JLXMC"], district=r["SSQ"])
              for i, r in enumerate(records)],
        sample_fields=("MPH", "LPH", "JLXMC", "SSQ"),
    )


# tw/ila/datong: ESRI; remove_prefix.
@case("tw/ila/datong")
def datong(s: Servers) -> Expected:
    p = sd.near((121.6, 24.67), 4)
    data = [
        ("中山路二段100號", "中山路二段", "中山里", "宜蘭市", "100號"),
        ("民權路一段 5號", "民權路一段", "大同里", "羅東鎮", "5號"),  # leading space trimmed
        ("泰雅路三段25巷3號", "泰雅路", "泰雅村", "大同鄉", "三段25巷3號"),
        ("復興路8號", "中正路", "復興里", "大同鄉", "復興路8號"),  # not a prefix: kept
    ]
    features = [sd.esri_point(i + 1, *p[i], ADDRESSALL=d[0], ROAD=d[1], VILLAGENAM=d[2],
                              TOWNNAME=d[3]) for i, d in enumerate(data)]
    return Expected(
        # An older MapServer without pagination: the dump goes by object ids.
        url=esri_layer(s, "tw-datong", features, supports_pagination=False),
        rows=[addr(p[i], number=d[4], street=d[1], city=d[2], district=d[3])
              for i, d in enumerate(data)],
        sample_fields=("ADDRESSALL", "ROAD"),
    )


def _check_referer(layer: str) -> Callable[[Servers, RunState, Path], None]:
    def check(s: Servers, state: RunState, outdir: Path) -> None:
        prefix = f"/arcgis/rest/services/{layer}/"
        sent = [r for r in s.arcgis.requests if r.path.startswith(prefix)]
        assert sent, "no request reached the layer"
        assert {r.headers.get("Referer") for r in sent} == {"https://maps.ccgisc.org/"}

    return check


# us/il/champaign: ESRI with request.headers (Referer) on every request.
@case("us/il/champaign")
def champaign(s: Servers) -> Expected:
    p = sd.near((-88.2434, 40.1164), 3)
    data = [("A1", 1776, "", "E WASHINGTON ST", "61802"),
            ("A2", 505, "APT 3", "S GOODWIN AVE", "61801"),
            ("A3", 202, "", "W HILL ST", "61820")]
    # The server spells two fields in capitals: ArcGIS and the conform match them regardless.
    features = [sd.esri_point(i + 1, *p[i], UniqueID=d[0], ADDNUM=d[1], SubAddress=d[2],
                              StreetName=d[3], ZIP=d[4]) for i, d in enumerate(data)]
    return Expected(
        url=esri_layer(s, "il-champaign-addresses", features),
        rows=[addr(p[i], id=d[0], number=str(d[1]), unit=d[2], street=d[3], postcode=d[4])
              for i, d in enumerate(data)],
        sample_fields=("UniqueID", "ADDNUM", "ZIP"),
        check=_check_referer("il-champaign-addresses"),
    )


@case("us/il/champaign", layer="parcels")
def champaign_parcels(s: Servers) -> Expected:
    shapes: list[shapely.Polygon] = _parcel_shapes((-88.2434, 40.1164), 3)
    # A lot with a hole (a courtyard parcel cut out): Esri's counter-clockwise inner ring.
    hole = sd.square(shapes[1].centroid.coords[0], 0.00005)
    shapes[1] = shapely.Polygon(shapes[1].exterior.coords, [hole.exterior.coords])
    pins = ["46-21-08-101-001", "46-21-08-101-002", "46-21-08-101-003"]
    features = [sd.esri_polygon(i + 1, g, PIN_DASH=pins[i]) for i, g in enumerate(shapes)]
    return Expected(
        url=esri_layer(s, "il-champaign-parcels", features, "esriGeometryPolygon"),
        rows=[{"pid": pin} for pin in pins], shapes=list(shapes), geometry_type="Polygon",
        sample_fields=("PIN_DASH",), check=_check_referer("il-champaign-parcels"),
    )


def _lines(origin: sd.LonLat, count: int) -> list[shapely.LineString]:
    return [shapely.LineString([c, (c[0] + 0.001, c[1] + 0.0005), (c[0] + 0.002, c[1])])
            for c in sd.near(origin, count, step=0.003)]


# us/tx/city_of_san_marcos: ESRI centerlines; map with else, mph_to_kph.
@case("us/tx/city_of_san_marcos", layer="centerlines")
def san_marcos(s: Servers) -> Expected:
    lines = _lines((-97.9414, 29.8833), 5)
    data = [
        (1001, "HOPKINS ST", "FT", 30, 3),
        (1002, "IH 35 N", "TF", 70, 1),
        (1003, "AQUARENA SPRINGS DR", "B", 35, 4),
        (1004, "ALLEY", None, None, 9),
        (1005, "GUADALUPE ST", " FT ", 25, 5),
    ]
    features = [sd.esri_polyline(i + 1, lines[i], MAXIMOID=d[0], FULLSTREET=d[1], ONEWAY=d[2],
                                 SPEEDLIMIT=d[3], CLASS=d[4], L_ZIP="78666", R_ZIP="78666")
                for i, d in enumerate(data)]
    # mph × 1.609344 rounded half up: 30 → 48.28, 70 → 112.65, 35 → 56.33, 25 → 40.23.
    expected = [
        ("1001", "HOPKINS ST", "yes", "48", "primary"),
        ("1002", "IH 35 N", "reverse", "113", "motorway"),
        ("1003", "AQUARENA SPRINGS DR", "no", "56", "secondary"),
        ("1004", "ALLEY", "no", "", "residential"),
        ("1005", "GUADALUPE ST", "yes", "40", "tertiary"),
    ]
    rows = [{"id": e[0], "name": e[1], "oneway": e[2], "speed": e[3], "classification": e[4],
             "surface": "", "addr_from_left": "", "addr_to_left": "", "addr_from_right": "",
             "addr_to_right": "", "zip_left": "78666", "zip_right": "78666"} for e in expected]
    return Expected(
        url=esri_layer(s, "tx-san-marcos", features, "esriGeometryPolyline"),
        rows=rows, shapes=list(lines), geometry_type="LineString",
        sample_fields=("MAXIMOID", "ONEWAY", "SPEEDLIMIT", "CLASS"),
    )


# us/wi/marathon: all four layers over ESRI.
@case("us/wi/marathon")
def marathon(s: Servers) -> Expected:
    p = sd.near((-89.6301, 44.9591), 3)
    data = [(1203.0, "N", "1ST", "ST", ""), (407.0, "", "GRAND", "AVE", "B"),
            (2100, "S", "GRAND", "AVE", "")]
    features = [sd.esri_point(i + 1, *p[i], HOUSE_NUMBER1=d[0], PREDIR=d[1], STREET1=d[2],
                              STREETTYPE=d[3], APTALPHA=d[4]) for i, d in enumerate(data)]
    # Real layers hold features without a geometry: dropped and counted.
    features.append({"attributes": {sd.OID: 4, "HOUSE_NUMBER1": 9.0, "PREDIR": "",
                                    "STREET1": "LOST", "STREETTYPE": "RD", "APTALPHA": ""},
                     "geometry": None})
    return Expected(
        url=esri_layer(s, "wi-marathon-addresses", features),
        rows=[addr(p[0], number="1203", street="N 1ST ST"),
              addr(p[1], number="407", street="GRAND AVE", unit="B"),
              addr(p[2], number="2100", street="S GRAND AVE")],
        dropped_rows=1, sample_fields=("HOUSE_NUMBER1", "STREET1"),
    )


@case("us/wi/marathon", layer="parcels")
def marathon_parcels(s: Servers) -> Expected:
    shapes = _parcel_shapes((-89.6301, 44.9591), 3)
    pins = ["291-2807-123-0001", "291-2807-123-0002", "291-2807-123-0003"]
    features = [sd.esri_polygon(i + 1, g, PIN=pins[i]) for i, g in enumerate(shapes)]
    return Expected(
        url=esri_layer(s, "wi-marathon-parcels", features, "esriGeometryPolygon"),
        rows=[{"pid": pin} for pin in pins], shapes=list(shapes), geometry_type="Polygon",
        sample_fields=("PIN",),
    )


@case("us/wi/marathon", layer="centerlines")
def marathon_centerlines(s: Servers) -> Expected:
    lines = _lines((-89.6301, 44.9591), 2)
    data = [("N 1ST ST", 1201.0, 1299.0, 1200.0, 1298.0, 54403),
            ("GRAND AVE", 401, 499, 400, 498, 54401)]
    features = [sd.esri_polyline(i + 1, lines[i], FULLNAME=d[0], LEFTFROM=d[1], LEFTTO=d[2],
                                 RIGHTFROM=d[3], RIGHTTO=d[4], ZIPCODE=d[5])
                for i, d in enumerate(data)]
    rows = [{"id": "", "name": d[0], "oneway": "", "speed": "", "classification": "",
             "surface": "", "addr_from_left": str(int(d[1])), "addr_to_left": str(int(d[2])),
             "addr_from_right": str(int(d[3])), "addr_to_right": str(int(d[4])),
             "zip_left": str(d[5]), "zip_right": str(d[5])} for d in data]
    return Expected(
        url=esri_layer(s, "wi-marathon-centerlines", features, "esriGeometryPolyline"),
        rows=rows, shapes=list(lines), geometry_type="LineString",
        sample_fields=("FULLNAME", "LEFTFROM"),
    )


@case("us/wi/marathon", layer="buildings")
def marathon_buildings(s: Servers) -> Expected:
    shapes = _parcel_shapes((-89.6311, 44.9581), 2, 0.00005)
    features = [sd.esri_polygon(i + 1, g) for i, g in enumerate(shapes)]
    return Expected(
        url=esri_layer(s, "wi-marathon-buildings", features, "esriGeometryPolygon"),
        rows=[{"id": "", "height": "", "levels": ""} for _ in shapes], shapes=list(shapes),
        geometry_type="Polygon", sample_fields=("OBJECTID",),
    )


SF_QUERY = ("?accessType=DOWNLOAD&api_foundry=true")


# us/ca/san_francisco addresses: CSV with spaces in field names, list fields, constants.
@case("us/ca/san_francisco")
def san_francisco(s: Servers) -> Expected:
    p = sd.near((-122.4194, 37.7749), 4)
    header = ["EAS FullID", "Address Number", "Address Number Suffix", "Street Name",
              "Street Type", "Unit Number", "ZIP Code", "Longitude", "Latitude", "Location"]
    raw = [
        ("495990-764765-0", "1", "", "DR CARLTON B GOODLETT", "PL", "", "94102"),
        ("200000-1-0", "100", "A", "MARKET", "ST", "", "94105"),
        ("300000-2-1", "1455", "", "MARKET", "ST", "2200", "94103"),
        ("300000-3-0", "50", "", "THE EMBARCADERO", "", "", "94105"),
    ]
    rows = [(*r, lon, lat, f"POINT ({lon} {lat})") for r, (lon, lat) in zip(raw, p, strict=True)]
    # The portal redirects the export to its file store, which sends validators.
    target = s.http.add("/storage/exports/ramy-di5m/rows.csv", sd.csv_bytes(header, rows),
                        content_type="text/csv", etag='"sf-rows-1"',
                        last_modified="Sat, 21 Nov 2026 08:00:00 GMT")
    url = s.http.add("/api/views/ramy-di5m/rows.csv", redirect_to=target)

    def validators(s: Servers, state: RunState, outdir: Path) -> None:
        index = json.loads((outdir / "index.json").read_text())
        assert index["etag"] == '"sf-rows-1"'
        assert index["last modified"] == "Sat, 21 Nov 2026 08:00:00 GMT"
        assert s.http.count("/storage/exports/ramy-di5m/rows.csv") == 1

    return Expected(
        check=validators,
        url=url + SF_QUERY,
        rows=[addr(p[i], id=r[0], number=f"{r[1]} {r[2]}".strip(),
                   street=f"{r[3]} {r[4]}".strip(), unit=r[5], postcode=r[6],
                   city="San Francisco", region="CA", accuracy="2") for i, r in enumerate(raw)],
        sample_fields=("EAS FullID", "Address Number", "Street Name"),
    )


@case("us/ca/san_francisco", layer="parcels")
def san_francisco_parcels(s: Servers) -> Expected:
    shapes = _parcel_shapes((-122.4194, 37.7749), 3)
    lots = ["0001001", "0001002", "3512001"]
    members = _shapefile_members(
        s, "sf-parcels", "geo_export_6a0c4d1b",
        [{"active": "true", "blklot": lot} for lot in lots], list(shapes), "EPSG:4326")
    query = ("?query=SELECT%20%60active%60%2C%20%60blklot%60%2C%20%60shape%60%0AWHERE%20%60"
             "active%60%20%3D%20TRUE%0AORDER%20BY%20%60active%60%20ASC%20NULL%20LAST&fourfour="
             "acdm-wktn&accessType=DOWNLOAD&method=export&format=Shapefile")
    url = s.http.add("/api/geospatial/acdm-wktn", sd.zip_bytes(members),
                     content_type="application/zip")
    return Expected(url=url + query, rows=[{"pid": lot} for lot in lots], shapes=list(shapes),
                    geometry_type="Polygon", sample_fields=("active", "blklot"))


@case("us/ca/san_francisco", layer="buildings")
def san_francisco_buildings(s: Servers) -> Expected:
    shapes = _parcel_shapes((-122.4184, 37.7759), 2, 0.00005)
    members = _shapefile_members(
        s, "sf-buildings", "geo_export_b1d2", [{"globalid": f"{{G{i}}}", "hgt_mediam": 12.5 + i}
                                               for i in range(2)],
        list(shapes), "EPSG:4326", types={"hgt_mediam": "float"})
    url = s.http.add("/api/geospatial/ynuv-fyni", sd.zip_bytes(members),
                     content_type="application/zip")
    return Expected(url=url + "?accessType=DOWNLOAD&method=export&format=Shapefile",
                    rows=[{"id": "", "height": "", "levels": ""} for _ in shapes],
                    shapes=list(shapes), geometry_type="Polygon",
                    sample_fields=("globalid", "hgt_mediam"))


@case("us/ca/san_francisco", layer="centerlines")
def san_francisco_centerlines(s: Servers) -> Expected:
    lines: list[BaseGeometry] = list(_lines((-122.4194, 37.7749), 4))
    # A street in two pieces (interrupted by a plaza): one feature, two Esri paths.
    second = shapely.affinity.translate(lines[3], xoff=0.0025)
    lines[3] = shapely.MultiLineString([lines[3], second])
    data = [(1000, "MARKET ST", "1", 1, 99, 2, 98, "94102"),
            (2000, "ALLEY", "0", 0, 0, 0, 0, "94110"),
            (3000, "OAK ST", "5", 100, 198, 101, 199, "94117"),
            (4000, "HWY 101", "2", None, None, None, None, "94124")]
    features = [sd.esri_polyline(i + 1, lines[i], cnn=d[0], streetname=d[1], classcode=d[2],
                                 lf_fadd=d[3], lf_toadd=d[4], rt_fadd=d[5], rt_toadd=d[6],
                                 zip_code=d[7]) for i, d in enumerate(data)]
    classes = ["primary", "service", "residential", "residential"]  # "2" is unmapped: else

    def text(v: int | None) -> str:
        return "" if v is None else str(v)

    rows = [{"id": str(d[0]), "name": d[1], "oneway": "", "speed": "",
             "classification": classes[i], "surface": "", "addr_from_left": text(d[3]),
             "addr_to_left": text(d[4]), "addr_from_right": text(d[5]),
             "addr_to_right": text(d[6]), "zip_left": d[7], "zip_right": d[7]}
            for i, d in enumerate(data)]
    return Expected(url=esri_layer(s, "ca-sf-centerlines", features, "esriGeometryPolyline"),
                    rows=rows, shapes=lines, geometry_type="MultiLineString",
                    sample_fields=("cnn", "streetname", "classcode"))


# us/mn/isanti: two entries in the addresses layer, two runs from two ESRI layers.
@case("us/mn/isanti", entry="address_points")
def isanti_points(s: Servers) -> Expected:
    p = sd.near((-93.2238, 45.5727), 2)
    data = [(225, "S MAIN ST", "", "CAMBRIDGE", "55008", "A-100"),
            (1901, "ATHENS ST NE", "UNIT 2", "ISANTI", "55040", "A-101")]
    features = [sd.esri_point(i + 1, *p[i], ANUMBER=d[0], FULL_STREET=d[1], SUB_ID1=d[2],
                              POSTCOMM=d[3], ZIP=d[4], ADD_ID=d[5]) for i, d in enumerate(data)]
    return Expected(
        url=esri_layer(s, "mn-isanti-points", features),
        rows=[addr(p[i], number=str(d[0]), street=d[1], unit=d[2], city=d[3], postcode=d[4],
                   id=d[5]) for i, d in enumerate(data)],
        sample_fields=("ANUMBER", "FULL_STREET"),
    )


@case("us/mn/isanti", entry="parcels", mode="cli")
def isanti_parcels(s: Servers) -> Expected:
    p = sd.near((-93.2338, 45.5627), 3)
    data = [("325 BIRCH ST N", "CAMBRIDGE", "55008", "16.001.0100", "325", "BIRCH ST N"),
            ("4035 1/2 ANDOVER RD NE", "ISANTI", "55040", "16.001.0200", "4035 1/2",
             "ANDOVER RD NE"),
            ("COUNTY RD 5", "STANCHFIELD", "55080", "16.001.0300", "", "COUNTY RD 5")]
    features = [sd.esri_polygon(i + 1, sd.square(p[i], 0.0003), SITEADDRESS=d[0], PSTLCITY=d[1],
                                PSTLZIP5=d[2], PARCELID=d[3]) for i, d in enumerate(data)]
    return Expected(
        url=esri_layer(s, "mn-isanti-parcels", features, "esriGeometryPolygon"),
        rows=[addr(p[i], number=d[4], street=d[5], city=d[1], postcode=d[2], id=d[3])
              for i, d in enumerate(data)],
        sample_fields=("SITEADDRESS", "PARCELID"),
    )


# --- checking outputs -----------------------------------------------------------------------


def read_geojson(outdir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (outdir / "out.geojson").read_text().splitlines()
            if line.strip()]


def read_csv(outdir: Path) -> list[dict[str, str]]:
    csv.field_size_limit(64 * 1024 * 1024)  # the 10 MB field case
    with (outdir / "out.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def assert_close(actual: tuple[float, float], expected: tuple[float, float], what: str) -> None:
    assert abs(actual[0] - expected[0]) <= TOLERANCE_DEG, f"{what}: lon {actual} != {expected}"
    assert abs(actual[1] - expected[1]) <= TOLERANCE_DEG, f"{what}: lat {actual} != {expected}"


def check_addresses(outdir: Path, expected: Expected) -> None:
    features = read_geojson(outdir)
    rows = read_csv(outdir)
    assert len(features) == len(rows) == len(expected.rows)
    for n, (feature, row, want) in enumerate(zip(features, rows, expected.rows, strict=True)):
        props = feature["properties"]
        got = {a: props[a] for a in ADDRESS_ATTRIBUTES}
        assert got == {a: want[a] for a in ADDRESS_ATTRIBUTES}, f"row {n}"
        assert {c: row[c] for c in CSV_COLUMNS.values()} == {
            c: want[a] for a, c in CSV_COLUMNS.items()}, f"csv row {n}"
        assert len(props["hash"]) == 16 and row["HASH"] == props["hash"]
        assert feature["geometry"]["type"] == "Point"
        lon, lat = feature["geometry"]["coordinates"]
        assert (float(row["LON"]), float(row["LAT"])) == (lon, lat)
        if "inside" in want:
            assert want["inside"].contains(shapely.Point(lon, lat)), f"row {n}"
        else:
            assert_close((lon, lat), (want["lon"], want["lat"]), f"row {n}")


def check_shapes(outdir: Path, expected: Expected) -> None:
    features = read_geojson(outdir)
    assert not (outdir / "out.csv").exists()
    assert len(features) == len(expected.rows)
    for n, (feature, want, shape) in enumerate(
            zip(features, expected.rows, expected.shapes, strict=True)):
        props = feature["properties"]
        assert {k: props[k] for k in want} == want, f"feature {n}"
        assert len(props["hash"]) == 16
        got = shapely.geometry.shape(feature["geometry"])
        assert got.geom_type == shape.geom_type, f"feature {n}"
        # Vertex for vertex within the tolerance, whatever ring start and orientation.
        assert shapely.get_num_coordinates(got) == shapely.get_num_coordinates(shape)
        assert shapely.hausdorff_distance(got, shape) <= TOLERANCE_DEG, f"feature {n}: {got}"


def check_run(case_: Case, s: Servers, expected: Expected, state: RunState, outdir: Path) -> None:
    index = json.loads((outdir / "index.json").read_text())
    assert index["source problem"] is None, index["error"]
    assert index["error"] is None
    assert index["skipped"] is False
    assert (index["source"], index["layer"], index["name"]) == (
        case_.path, case_.layer, case_.entry)
    assert index["feature count"] == len(expected.rows)
    assert index["geometry type"] == expected.geometry_type
    assert index["dropped rows"] == expected.dropped_rows
    assert index["tests passed"] is expected.tests_passed
    assert index["fingerprint"]
    terms = next(e for e in real_source(case_.path)["layers"][case_.layer]
                 if e["name"] == case_.entry).get("license") or {}
    assert index["license"] == (terms.get("text") or terms.get("url"))
    assert index["attribution name"] == terms.get("attribution name")
    assert index["cache"] and (outdir / index["cache"]).exists()
    attributes = [a for a in expected.rows[0] if a not in ("lon", "lat", "inside")]
    assert index["attribute counts"] == {
        a: sum(1 for row in expected.rows if row[a] != "") for a in attributes}
    assert index["preview"] is None or (outdir / index["preview"]).stat().st_size > 0
    if case_.layer == "addresses":
        placed = [(r["lon"], r["lat"]) for r in expected.rows if "inside" not in r]
        if len(placed) == len(expected.rows):
            lons, lats = zip(*placed, strict=True)
            want = (min(lons), min(lats), max(lons), max(lats))
            assert all(abs(a - b) <= TOLERANCE_DEG
                       for a, b in zip(index["bounds"], want, strict=True)), index["bounds"]
        assert index["processed zip"] == "processed.zip"
        check_addresses(outdir, expected)
        with zipfile.ZipFile(outdir / "processed.zip") as archive:
            members = [n for n in archive.namelist() if n.endswith(".csv")]
            assert len(members) == 1, archive.namelist()
            assert archive.read(members[0]) == (outdir / "out.csv").read_bytes()
    else:
        check_shapes(outdir, expected)
    sample = json.loads((outdir / "sample.json").read_text())
    assert index["sample"] == "sample.json"
    header, *records = sample
    assert set(expected.sample_fields) <= set(header), header
    assert "__geometry__" not in header
    assert 1 <= len(records) <= 5 and all(len(r) == len(header) for r in records)
    if expected.check:
        expected.check(s, state, outdir)


@pytest.mark.parametrize("case_", CASES, ids=[c.id for c in CASES])
def test_real_source(case_: Case, servers: Servers, tmp_path: Path) -> None:
    expected = case_.build(servers)
    source = with_data_url(real_source(case_.path), case_.layer, case_.entry, expected.url)
    if case_.mode == "cli":
        done, outdir = run_cli(source, case_.path, case_.layer, case_.entry, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip() == str(outdir / "index.json")
        state = RunState.read(outdir / "index.json")
        assert (outdir / "output.txt").exists()
    else:
        request = request_for(source, case_.path, case_.layer, case_.entry, tmp_path)
        if case_.mode == "child":
            state = run_in_child(request)
            assert (Path(request.outdir) / "output.txt").exists()
        else:
            state = run_in_process(request)
        outdir = Path(request.outdir)
    check_run(case_, servers, expected, state, outdir)


def test_same_data_gives_the_same_outputs(servers: Servers, tmp_path: Path) -> None:
    """Hashes are deterministic: two runs of one entry over the same data write the same
    out.csv and out.geojson, byte for byte."""
    expected = lane_county(servers)
    source = with_data_url(real_source("us/ks/lane_county"), "addresses", "county",
                           expected.url)
    outputs = []
    for attempt in ("first", "second"):
        run_in_process(request_for(source, "us/ks/lane_county", "addresses", "county",
                                   tmp_path / attempt))
        out = tmp_path / attempt / "out"
        outputs.append(((out / "out.csv").read_bytes(), (out / "out.geojson").read_bytes()))
    assert outputs[0] == outputs[1]
    assert len({r["HASH"] for r in read_csv(tmp_path / "first" / "out")}) == 4


def test_every_real_source_and_entry_has_a_case() -> None:
    covered = {(c.path, c.layer, c.entry) for c in CASES} | {("us/mo/dallas", "addresses",
                                                              "county")}
    wanted = set()
    for file in SOURCES.rglob("*.json"):
        path = file.relative_to(SOURCES).with_suffix("").as_posix()
        for layer, entries in json.loads(file.read_text())["layers"].items():
            wanted |= {(path, layer, e["name"]) for e in entries}
    assert len({w[0] for w in wanted}) == 24
    assert wanted == covered


def test_gzip_source_already_inflated_by_content_encoding(servers: Servers,
                                                          tmp_path: Path) -> None:
    """fr/01 says gzip; a server (or proxy) that sends the .gz with Content-Encoding: gzip has
    it inflated by the client, and the run must read the plain CSV it got."""
    header = ["id", "numero", "rep", "nom_voie", "code_postal", "nom_commune", "lon", "lat",
              "type_position"]
    p = sd.near((5.2258, 46.2052), 2)
    plain = sd.csv_bytes(header, [
        ("01053_0100_00012", "12", "bis", "Rue de la République", "01000", "Bourg-en-Bresse",
         *p[0], "entrée"),
        ("01053_0100_00014", "14", "", "Rue de la République", "01000", "Bourg-en-Bresse",
         *p[1], "parcelle"),
    ], delimiter=";")
    url = servers.http.add("/data/ban/encoded/adresses-01.csv.gz", sd.gzip_bytes(plain),
                           content_type="text/csv", headers={"Content-Encoding": "gzip"})
    source = with_data_url(real_source("fr/01/statewide"), "addresses", "state", url)
    state = run_in_process(request_for(source, "fr/01/statewide", "addresses", "state",
                                       tmp_path))
    assert state.source_problem is None, state.error
    rows = read_geojson(tmp_path / "out")
    assert [(r["properties"]["number"], r["properties"]["accuracy"]) for r in rows] == [
        ("12bis", "2"), ("14", "2")]


def test_latin1_csv_when_the_source_says_so(servers: Servers, tmp_path: Path) -> None:
    """ca/qc/province with ``"encoding": "ISO-8859-1"`` added, over a Latin-1 file."""
    p = sd.near((-71.2080, 46.8139), 2)
    header = ["numero_municipal", "numero_municipal_suffixe", "numero_unite",
              "odonyme_recompose_court", "nom_municipalite", "code_postal", "latitude",
              "longitude"]
    raw = [("10", "", "", "rue Saint-Louis", "Québec", "G1R 3Z2"),
           ("4", "B", "", "côte de la Fabrique", "Lévis", "G6V 1A1")]
    rows = [(*r, y, x) for r, (x, y) in zip(raw, sd.to_srs(p, "EPSG:4617"), strict=True)]
    body = sd.zip_bytes({"Adresses.csv": sd.csv_bytes(header, rows, encoding="iso-8859-1")})
    assert "Québec".encode("iso-8859-1") in zipfile.ZipFile(io.BytesIO(body)).read(
        "Adresses.csv")
    source = real_source("ca/qc/province")
    source["layers"]["addresses"][0]["conform"]["encoding"] = "ISO-8859-1"
    source = with_data_url(source, "addresses", "state",
                           servers.http.add("/diffusion/latin1/RQA_CSV.zip", body))
    state = run_in_process(request_for(source, "ca/qc/province", "addresses", "state",
                                       tmp_path))
    assert state.source_problem is None, state.error
    got = [(r["NUMBER"], r["STREET"], r["CITY"]) for r in read_csv(tmp_path / "out")]
    assert got == [("10", "rue Saint-Louis", "Québec"), ("4B", "côte de la Fabrique", "Lévis")]


def test_failing_acceptance_test_fails_the_run_before_download(servers: Servers,
                                                               tmp_path: Path) -> None:
    source = real_source("us/tx/city_of_mckinney")
    entry = source["layers"]["addresses"][0]
    entry["test"]["acceptance-tests"][1]["expected"]["unit"] = "BLDG 2"  # wrong on purpose
    url = servers.arcgis.layer_url("tx-mckinney-never-asked")
    source = with_data_url(source, "addresses", "city", url)
    state = run_in_process(request_for(source, "us/tx/city_of_mckinney", "addresses", "city",
                                       tmp_path))
    assert state.source_problem == "test_failed"
    assert state.tests_passed is False
    assert "BLDG 1" in (state.error or "") and "BLDG 2" in (state.error or "")
    assert not any("never-asked" in r.path for r in servers.arcgis.requests)


def test_shapefile_without_code_page_is_read_as_latin1(servers: Servers,
                                                      tmp_path: Path) -> None:
    """us/nc/davie as many county exports ship it: a Latin-1 dbf, no .cpg, code page 0.
    GDAL itself reports such a layer as ISO-8859-1 (the shapefile default), so "CAÑON" must
    come out as "CAÑON"; and a UTF-8 dbf without .cpg must stay readable too."""
    srs = "EPSG:2264"
    p = sd.near((-80.5612, 35.8940), 2)
    records = [{"HSNM": 9, "PREDIR": "", "STREET": "CAÑON", "TYPE": "TRL", "POSTDIR": "",
                "UNIT": ""},
               {"HSNM": 11, "PREDIR": "", "STREET": "MAIN", "TYPE": "ST", "POSTDIR": "",
                "UNIT": ""}]
    squares = [sd.square(xy, 10.0) for xy in sd.to_srs(p, srs)]
    latin1 = _shapefile_members(servers, "davie-latin1", "address", records, list(squares),
                                srs, types={"HSNM": "int"}, latin1_without_cpg=True)
    utf8 = _shapefile_members(servers, "davie-utf8", "address", records, list(squares), srs,
                              types={"HSNM": "int"})
    del utf8["address.cpg"]
    for name, members in (("latin1", latin1), ("utf8", utf8)):
        url = servers.http.add(f"/DavieGISweb/gisdata/{name}/address.zip",
                               sd.zip_bytes(members))
        source = with_data_url(real_source("us/nc/davie"), "addresses", "county", url)
        state = run_in_process(request_for(source, "us/nc/davie", "addresses", "county",
                                           tmp_path / name))
        assert state.source_problem is None, state.error
        assert [r["STREET"] for r in read_csv(tmp_path / name / "out")] == [
            "CAÑON TRL", "MAIN ST"], name
        sample = json.loads((tmp_path / name / "out" / "sample.json").read_text())
        assert sample[1][sample[0].index("STREET")] == "CAÑON"


# us/mo/dallas: skip: true and no conform: skipped, not failed, and nothing fetched.
def test_skipped_source_is_skipped_not_failed(servers: Servers, tmp_path: Path) -> None:
    url = servers.arcgis.layer_url("mo-dallas")
    source = with_data_url(real_source("us/mo/dallas"), "addresses", "county", url)
    done, outdir = run_cli(source, "us/mo/dallas", "addresses", "county", tmp_path)
    assert done.returncode == 0, done.stderr
    index = json.loads((outdir / "index.json").read_text())
    assert index["skipped"] is True
    assert index["source problem"] == "skip_source"
    assert "skip" in index["error"]
    assert index["feature count"] is None
    assert not any("mo-dallas" in r.path for r in servers.arcgis.requests)
    # The same through run_entry: a skipped state does not count as a failure.
    state = run_in_process(request_for(source, "us/mo/dallas", "addresses", "county",
                                       tmp_path / "again"))
    assert state.skipped and not state.succeeded


# --- bad inputs -------------------------------------------------------------------------------

QUICK_RETRY = Retry(tries=3, backoff_s=0.05)


@pytest.fixture
def quick_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_entry's fetch with short backoff and a 1 s idle limit (the defaults are minutes)."""
    monkeypatch.setattr(run_module, "fetch", functools.partial(
        fetch, retry=QUICK_RETRY, timeouts=Timeouts(connect_s=2.0, sock_read_s=1.0)))


def lane_source(url: str, **conform: Any) -> dict[str, Any]:
    source = with_data_url(real_source("us/ks/lane_county"), "addresses", "county", url)
    source["layers"]["addresses"][0]["conform"].update(conform)
    return source


def lane_run(url: str, tmp_path: Path, **options: Any) -> RunState:
    conform = options.pop("conform", {})
    return run_in_process(request_for(lane_source(url, **conform), "us/ks/lane_county",
                                      "addresses", "county", tmp_path, **options))


LANE_HEADER = ["NUM", "STR", "CITY", "ZIP", "LON", "LAT"]


def lane_csv(count: int) -> bytes:
    return sd.csv_bytes(LANE_HEADER, [(str(i + 1), "MAIN ST", "DIGHTON", "67839", *pt)
                                      for i, pt in enumerate(sd.near((-100.4668, 38.4819),
                                                                     count))])


def test_404_is_download_failed(servers: Servers, tmp_path: Path, quick_fetch: None) -> None:
    state = lane_run(servers.http.url("/bad/missing.csv"), tmp_path)
    assert state.source_problem == "download_failed"
    assert "404" in (state.error or "")
    assert state.feature_count is None
    assert servers.http.count("/bad/missing.csv") == 1  # a 404 is final: no retries
    assert state.retryable is False
    assert json.loads((tmp_path / "out" / "index.json").read_text())["retryable"] is False
    # The same through `oa-machine process-one`: exit status 1 and the reason on stderr.
    source = lane_source(servers.http.url("/bad/missing.csv"))
    done, outdir = run_cli(source, "us/ks/lane_county", "addresses", "county", tmp_path / "cli")
    assert done.returncode == 1
    assert "failed (download_failed)" in done.stderr and "404" in done.stderr
    assert json.loads((outdir / "index.json").read_text())["source problem"] == "download_failed"


def test_503_for_ever_is_retryable(servers: Servers, tmp_path: Path, quick_fetch: None) -> None:
    url = servers.http.add("/bad/down.csv", b"", failures=[503] * 10)
    state = lane_run(url, tmp_path)
    assert state.source_problem == "download_failed"
    assert "after 3 tries" in (state.error or "") and "503" in (state.error or "")
    assert state.retryable is True
    assert json.loads((tmp_path / "out" / "index.json").read_text())["retryable"] is True


def test_500_then_success(servers: Servers, tmp_path: Path, quick_fetch: None) -> None:
    url = servers.http.add("/bad/flaky.csv", lane_csv(3), content_type="text/csv",
                           failures=[500])
    state = lane_run(url, tmp_path)
    assert state.source_problem is None, state.error
    assert state.feature_count == 3
    assert servers.http.count("/bad/flaky.csv") == 2


def test_idle_connection_times_out(servers: Servers, tmp_path: Path, quick_fetch: None) -> None:
    body = lane_csv(3)
    url = servers.http.add("/bad/stalls.csv", body, content_type="text/csv",
                           stall_after_bytes=20, stall_s=30.0)
    state = lane_run(url, tmp_path)
    assert state.source_problem == "download_failed"
    assert "timeout" in (state.error or "").lower() or "timed out" in (state.error or "").lower()
    assert not list((tmp_path / "work" / "download").glob("download*"))


def test_truncated_zip(servers: Servers, tmp_path: Path) -> None:
    whole = sd.zip_bytes({"a.csv": lane_csv(200)})
    url = servers.http.add("/bad/truncated.zip", whole[: len(whole) // 2])
    source = lane_source(url)
    source["layers"]["addresses"][0]["compression"] = "zip"
    state = run_in_process(request_for(source, "us/ks/lane_county", "addresses", "county",
                                       tmp_path))
    assert state.source_problem == "download_failed"
    assert "truncated or corrupt" in (state.error or "")


def test_zip_bomb_is_refused(servers: Servers, tmp_path: Path) -> None:
    bomb = sd.zip_bytes({"a.csv": b"NUM,STR\r\n" + b"0" * 5_000_000})
    assert len(bomb) < 20_000
    source = lane_source(servers.http.add("/bad/bomb.zip", bomb))
    source["layers"]["addresses"][0]["compression"] = "zip"
    state = run_in_process(request_for(source, "us/ks/lane_county", "addresses", "county",
                                       tmp_path, max_unpacked_bytes=100_000))
    assert state.source_problem == "download_failed"
    assert "expands past the limit of 100000 bytes" in (state.error or "")
    unpacked = sum(f.stat().st_size for f in (tmp_path / "work").rglob("*") if f.is_file()
                   and "unpacked" in f.parts)
    assert unpacked <= 100_000 + 1024 * 1024  # at most one block past the limit
    # The bomb is not kept as the run's cache, so it is never uploaded.
    assert state.cache is None and not list((tmp_path / "out").glob("cache*"))
    assert json.loads((tmp_path / "out" / "index.json").read_text())["cache"] is None
    assert state.retryable is False


def test_gzip_encoded_bomb_is_refused(servers: Servers, tmp_path: Path) -> None:
    bomb = sd.gzip_bytes(b"NUM,STR\r\n" + b"0" * 5_000_000)
    assert len(bomb) < 20_000
    url = servers.http.add("/bad/encoded-bomb.csv", bomb, content_type="text/csv",
                           headers={"Content-Encoding": "gzip"})
    state = lane_run(url, tmp_path, max_unpacked_bytes=100_000)
    assert state.source_problem == "download_failed"
    assert url in (state.error or "")
    assert "limit of 100000 bytes (MAX_UNPACKED_BYTES)" in (state.error or "")
    assert state.cache is None and not list((tmp_path / "out").glob("cache*"))
    assert not list((tmp_path / "work").rglob("download*.*"))


def test_download_over_the_limit_is_refused(servers: Servers, tmp_path: Path) -> None:
    url = servers.http.add("/bad/huge.csv", lane_csv(2000), content_type="text/csv")
    state = lane_run(url, tmp_path, max_download_bytes=10_000)
    assert state.source_problem == "download_failed"
    assert url in (state.error or "")
    assert "limit of 10000 bytes (MAX_DOWNLOAD_BYTES)" in (state.error or "")
    assert state.cache is None and not list((tmp_path / "out").glob("cache*"))


def test_path_traversal_member_is_refused(servers: Servers, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data/../../evil.csv", lane_csv(2))
        archive.writestr("a.csv", lane_csv(2))
    source = lane_source(servers.http.add("/bad/traversal.zip", buffer.getvalue()))
    source["layers"]["addresses"][0]["compression"] = "zip"
    state = run_in_process(request_for(source, "us/ks/lane_county", "addresses", "county",
                                       tmp_path))
    assert state.source_problem == "download_failed"
    assert "escapes the folder" in (state.error or "")
    assert not list(tmp_path.rglob("evil.csv"))


def test_invalid_source_json_fails_the_cli(tmp_path: Path) -> None:
    source_file = tmp_path / "broken.json"
    source_file.write_text('{"schema": 2, "layers": {"addresses": [')
    done = subprocess.run([str(OA_MACHINE), "process-one", str(source_file), str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LOG_FORMAT": "json"})
    assert done.returncode == 1
    assert "broken.json" in done.stderr
    assert not (tmp_path / "o" / "index.json").exists()


def test_unknown_format(servers: Servers, tmp_path: Path) -> None:
    url = servers.http.add("/bad/data.xlsx", b"not a spreadsheet either")
    source = json.loads(json.dumps(real_source("us/ks/lane_county")))  # unvalidated on purpose
    entry = source["layers"]["addresses"][0]
    entry["data"] = url
    entry["conform"]["format"] = "xlsx"
    state = run_in_process(request_for(source, "us/ks/lane_county", "addresses", "county",
                                       tmp_path))
    assert state.source_problem == "unknown_format"
    assert "xlsx" in (state.error or "")


def test_csv_rows_of_the_wrong_width_are_skipped_and_counted(servers: Servers,
                                                             tmp_path: Path) -> None:
    p = sd.near((-100.4668, 38.4819), 4)
    body = (sd.csv_bytes(LANE_HEADER, [("1", "A ST", "DIGHTON", "67839", *p[0])])
            + b"2,B ST,DIGHTON,67839," + str(p[1][0]).encode() + b"\r\n"  # one column short
            + sd.csv_bytes(None, [("3", "C ST", "DIGHTON", "67839", *p[2], "extra")])
            + sd.csv_bytes(None, [("4", "D ST", "DIGHTON", "67839", *p[3])]))
    url = servers.http.add("/bad/widths.csv", body, content_type="text/csv")
    with capture_logs() as logs:
        state = lane_run(url, tmp_path)
    assert state.source_problem is None, state.error
    assert state.feature_count == 2
    assert [r["NUMBER"] for r in read_csv(tmp_path / "out")] == ["1", "4"]
    skipped = [e for e in logs if e["event"] == "csv.row_skipped"]
    assert len(skipped) == 2
    total = [e for e in logs if e["event"] == "csv.rows_skipped"]
    assert total and total[0]["rows"] == 2


@pytest.mark.parametrize("encoding", ["utf-8", "cp949"])
def test_ten_megabyte_field(servers: Servers, tmp_path: Path, encoding: str) -> None:
    """A 10 MB value (far past Arrow's 1 MiB block) is read whole, in UTF-8 natively and in
    CP949 through the recoder; the other rows are unharmed."""
    # 10 MiB of text in the file: 1-byte letters in UTF-8, 2-byte Hangul in CP949.
    long_street = "N" * (10 * 1024 * 1024) if encoding == "utf-8" else "길" * (5 * 1024 * 1024)
    p = sd.near((-100.4668, 38.4819), 2)
    body = sd.csv_bytes(LANE_HEADER, [("1", long_street, "DIGHTON", "67839", *p[0]),
                                      ("2", "SHORT ST", "DIGHTON", "67839", *p[1])],
                        encoding=encoding)
    assert len(body) > 10_000_000
    url = servers.http.add(f"/bad/long-{encoding}.csv", body, content_type="text/csv")
    state = lane_run(url, tmp_path, conform={"encoding": encoding})
    assert state.source_problem is None, state.error
    assert state.feature_count == 2
    rows = read_csv(tmp_path / "out")
    assert rows[0]["STREET"] == long_street and rows[1]["STREET"] == "SHORT ST"


def test_html_page_instead_of_csv_names_the_missing_field(servers: Servers,
                                                          tmp_path: Path) -> None:
    """A portal answering 200 with an HTML page: the run fails saying which field is missing
    and which fields there are."""
    url = servers.http.add("/bad/login.csv", b"<html><body>Please log in</body></html>\n",
                           content_type="text/html")
    state = lane_run(url, tmp_path)
    assert state.source_problem == "conform_failed"
    assert "'NUM'" in (state.error or "") and "<html><body>Please log in</body></html>" in (
        state.error or "")


def test_csv_with_a_duplicated_column_name(servers: Servers, tmp_path: Path) -> None:
    """The reference read rows as dicts, so the last of two same-named columns won (this
    crashed with KeyError 'Field "STR" exists 2 times in schema' before the reader made
    names unique)."""
    p = sd.near((-100.4668, 38.4819), 1)
    body = sd.csv_bytes(["NUM", "STR", "STR", "CITY", "ZIP", "LON", "LAT"],
                        [("1", "OLD ST", "MAIN ST", "DIGHTON", "67839", *p[0])])
    url = servers.http.add("/bad/duplicate-column.csv", body, content_type="text/csv")
    state = lane_run(url, tmp_path)
    assert state.source_problem is None, state.error
    assert read_csv(tmp_path / "out")[0]["STREET"] == "MAIN ST"
    sample = json.loads((tmp_path / "out" / "sample.json").read_text())
    assert sample[0][:3] == ["NUM", "STR (2)", "STR"]
    assert sample[1][:3] == ["1", "OLD ST", "MAIN ST"]


def test_header_only_csv_has_no_features(servers: Servers, tmp_path: Path) -> None:
    url = servers.http.add("/bad/empty.csv", sd.csv_bytes(LANE_HEADER, []),
                           content_type="text/csv")
    state = lane_run(url, tmp_path)
    assert state.source_problem == "no_features"
    assert state.feature_count == 0


def test_zip_without_the_named_file(servers: Servers, tmp_path: Path) -> None:
    """ch/uri names ch-ur.csv; a zip that lacks it must not be read from another member."""
    header = ["gwr_egid", "hausnummer", "strassennamen", "ortschaft", "plz", "X", "Y"]
    body = sd.zip_bytes({"ch-sz.csv": sd.csv_bytes(header, [("1", "1", "A", "B", "6430",
                                                              8.6, 47.0)])})
    url = servers.http.add("/bad/ch-ur.csv.zip", body)
    source = with_data_url(real_source("ch/uri"), "addresses", "city", url)
    state = run_in_process(request_for(source, "ch/uri", "addresses", "city", tmp_path))
    assert state.source_problem == "download_failed"
    assert "ch-ur.csv" in (state.error or "")


def _regexp_source(url: str, pattern: str) -> dict[str, Any]:
    return lane_source(url, city={"function": "regexp", "field": "CITY", "pattern": pattern,
                                  "replace": "x"})


def test_catastrophic_regexp_is_stopped_by_the_time_limit(servers: Servers,
                                                           tmp_path: Path) -> None:
    p = sd.near((-100.4668, 38.4819), 1)
    body = sd.csv_bytes(LANE_HEADER, [("1", "A ST", "a" * 40 + "!", "67839", *p[0])])
    url = servers.http.add("/bad/evil-regexp.csv", body, content_type="text/csv")
    # `(a+)+$` runs on RE2, which does not backtrack: the run simply finishes.
    fast = run_in_child(request_for(_regexp_source(url, "(a+)+$"), "us/ks/lane_county",
                                    "addresses", "county", tmp_path / "re2"), timeout_s=30)
    assert fast.source_problem is None, fast.error
    assert read_csv(tmp_path / "re2" / "out")[0]["CITY"] == "a" * 40 + "!"
    # A look-ahead sends the same pattern to Python's backtracking engine: the child is
    # stopped at its wall-clock limit and the run fails with "timeout".
    slow = run_in_child(request_for(_regexp_source(url, "(?=a)(a+)+$"), "us/ks/lane_county",
                                    "addresses", "county", tmp_path / "python"), timeout_s=3)
    assert slow.source_problem == "timeout"
    assert "time limit of 3 s" in (slow.error or "")
    index = json.loads((tmp_path / "python" / "out" / "index.json").read_text())
    assert index["source problem"] == "timeout"

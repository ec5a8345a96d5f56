"""Readers: every format written here with pyogrio (or by hand for CSV) and read back."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyogrio
import pytest
import shapely
from pyogrio.raw import write_arrow

from services.worker.conform.csv_reader import CsvReader
from services.worker.conform.geometry import lonlat_from_wkb, source_crs
from services.worker.conform.ogr_reader import to_strings
from services.worker.conform.readers import GEOMETRY_COLUMN, Reader, open_reader
from services.worker.errors import RunError

KOREAN = "서울특별시 종로구 세종대로"
JAPANESE = "東京都千代田区丸の内 森鷗外"  # 鷗 is in JIS X 0213, not in Shift-JIS or CP932
GERMAN = "Straße, Genève, Zürich"


def read_all(path: Path, conform: dict[str, Any], **kwargs: Any) -> tuple[Reader, pa.Table]:
    with open_reader(path, conform, **kwargs) as reader:
        batches = list(reader.batches())
        for batch in batches:
            assert all(batch.schema.field(name).type == pa.string() for name in reader.fields), (
                batch.schema
            )
        schema = batches[0].schema if batches else pa.schema([])
        return reader, pa.Table.from_batches(batches, schema=schema)


def wkb_array(geoms: list[shapely.Geometry]) -> pa.Array:
    return pa.array(list(shapely.to_wkb(np.array(geoms, dtype=object))), pa.binary())


def write_layer(
    path: Path,
    columns: dict[str, pa.Array],
    geoms: list[shapely.Geometry],
    geometry_type: str,
    crs: str = "EPSG:4326",
    **kwargs: Any,
) -> None:
    table = pa.table({**columns, "geometry": wkb_array(geoms)})
    write_arrow(
        table, str(path), geometry_name="geometry", geometry_type=geometry_type, crs=crs, **kwargs
    )


def typed_columns() -> dict[str, pa.Array]:
    return {
        "NUMBER": pa.array([12, None], pa.int32()),
        "REALNUM": pa.array([12.0, 12.5], pa.float64()),
        "STREET": pa.array(["Main St", GERMAN], pa.string()),
        "BUILT": pa.array([dt.date(2024, 1, 31), None], pa.date32()),
    }


# -- OGR formats --------------------------------------------------------------------------


def test_shapefile_points_with_prj(tmp_path: Path) -> None:
    path = tmp_path / "address.shp"
    write_layer(
        path, typed_columns(), [shapely.Point(6_003_000, 2_112_000)] * 2, "Point", "EPSG:2227"
    )
    assert (tmp_path / "address.prj").exists()

    reader, table = read_all(path, {"format": "shapefile"})
    assert reader.fields == ["NUMBER", "REALNUM", "STREET", "BUILT"]
    assert reader.crs is not None and reader.crs.to_epsg() == 2227
    assert reader.geometry_type == "Point"
    assert table.column_names == [*reader.fields, GEOMETRY_COLUMN]
    assert table.schema.field(GEOMETRY_COLUMN).type == pa.binary()
    assert table.column("NUMBER").to_pylist() == ["12", None]
    assert table.column("REALNUM").to_pylist() == ["12.0", "12.5"]
    assert table.column("STREET").to_pylist() == ["Main St", GERMAN]
    assert table.column("BUILT").to_pylist() == ["2024-01-31", None]
    point = shapely.from_wkb(table.column(GEOMETRY_COLUMN)[0].as_py())
    assert (point.x, point.y) == (6_003_000, 2_112_000)
    # The file's CRS carries through to a position near San Francisco City Hall.
    lon, lat = lonlat_from_wkb(table.column(GEOMETRY_COLUMN).combine_chunks(), reader.crs)
    assert -122.45 < lon[0] < -122.40 and 37.75 < lat[0] < 37.80


def test_shapefile_without_its_shx_index_is_still_read(tmp_path: Path) -> None:
    path = tmp_path / "address.shp"
    write_layer(path, typed_columns(), [shapely.Point(1, 2), shapely.Point(3, 4)], "Point",
                "EPSG:4326")
    (tmp_path / "address.shx").unlink()

    _reader, table = read_all(path, {"format": "shapefile"})
    points = shapely.from_wkb(table.column(GEOMETRY_COLUMN).to_pylist())
    assert [(p.x, p.y) for p in points] == [(1, 2), (3, 4)]
    assert table.column("STREET").to_pylist() == ["Main St", GERMAN]


def test_shapefile_with_a_truncated_dbf_fails_instead_of_losing_rows(tmp_path: Path) -> None:
    path = tmp_path / "address.shp"
    count = 1000
    columns = {"STREET": pa.array([f"street {i}" for i in range(count)], pa.string())}
    write_layer(path, columns, [shapely.Point(i, i) for i in range(count)], "Point",
                "EPSG:4326")
    dbf = tmp_path / "address.dbf"
    with dbf.open("r+b") as handle:
        handle.truncate(dbf.stat().st_size // 2)

    with pytest.raises(RunError) as info:
        read_all(path, {"format": "shapefile"})
    assert info.value.problem == "conform_failed"
    assert "declares 1000 features" in str(info.value) and "truncated" in str(info.value)


def test_shapefile_polygons(tmp_path: Path) -> None:
    path = tmp_path / "parcels.shp"
    squares = [shapely.box(0, 0, 1, 1), shapely.box(10, 10, 12, 12)]
    write_layer(path, {"PIN": pa.array(["a", "b"])}, squares, "Polygon")
    reader, table = read_all(path, {"format": "shapefile-polygon"})
    assert reader.geometry_type == "Polygon"
    lon, lat = lonlat_from_wkb(table.column(GEOMETRY_COLUMN).combine_chunks(), reader.crs)
    assert 0 < lon[0] < 1 and 0 < lat[0] < 1
    assert 10 < lon[1] < 12 and 10 < lat[1] < 12
    assert table.column("PIN").to_pylist() == ["a", "b"]


def test_shapefile_encoding_from_the_conform(tmp_path: Path) -> None:
    path = tmp_path / "kr.shp"
    write_layer(
        path, {"ROAD": pa.array([KOREAN])}, [shapely.Point(127, 37.5)], "Point", encoding="CP949"
    )
    # Korean sources ship without a .cpg: only the conform knows the encoding.
    (tmp_path / "kr.cpg").unlink()
    assert KOREAN.encode("cp949") in (tmp_path / "kr.dbf").read_bytes()
    _, table = read_all(path, {"format": "shapefile", "encoding": "CP949"})
    assert table.column("ROAD").to_pylist() == [KOREAN]


def test_geojson(tmp_path: Path) -> None:
    path = tmp_path / "data.geojson"
    write_layer(
        path,
        {"number": pa.array([7, 8], pa.int64()), "street": pa.array(["Rue A", None])},
        [shapely.Point(2.35, 48.85), shapely.Point(2.36, 48.86)],
        "Point",
        driver="GeoJSON",
    )
    reader, table = read_all(path, {"format": "geojson"})
    assert reader.fields == ["number", "street"]
    assert reader.crs is not None and reader.crs.to_epsg() == 4326
    assert table.column("number").to_pylist() == ["7", "8"]
    assert table.column("street").to_pylist() == ["Rue A", None]
    lon, lat = lonlat_from_wkb(table.column(GEOMETRY_COLUMN).combine_chunks(), reader.crs)
    np.testing.assert_allclose(lon, [2.35, 2.36])
    np.testing.assert_allclose(lat, [48.85, 48.86])


def test_line_delimited_geojson_as_written_by_the_esri_downloader(tmp_path: Path) -> None:
    path = tmp_path / "esri.geojsonl"
    features = [
        {
            "type": "Feature",
            "properties": {"ADDR": "1 Main", "ZIP": "97001"},
            "geometry": {"type": "Point", "coordinates": [-121.1, 44.6]},
        },
        {
            "type": "Feature",
            "properties": {"ADDR": "2 Main"},
            "geometry": {"type": "Point", "coordinates": [-121.2, 44.7]},
        },
        {"type": "Feature", "properties": {"ADDR": "3 Main", "ZIP": "97003"}, "geometry": None},
    ]
    path.write_text("\n".join(json.dumps(f) for f in features) + "\n", encoding="utf-8")
    reader, table = read_all(path, {"format": "geojson"}, batch_rows=2)
    assert reader.fields == ["ADDR", "ZIP"]
    assert table.column("ADDR").to_pylist() == ["1 Main", "2 Main", "3 Main"]
    assert table.column("ZIP").to_pylist() == ["97001", None, "97003"]
    assert table.column(GEOMETRY_COLUMN)[2].as_py() is None
    lon, lat = lonlat_from_wkb(
        table.column(GEOMETRY_COLUMN).combine_chunks(), source_crs({}, reader.crs)
    )
    assert (lon[1], lat[1]) == (-121.2, 44.7)


@pytest.mark.parametrize("suffix", [".gml", ".xml"])
def test_gml(tmp_path: Path, suffix: str) -> None:
    written = tmp_path / "addresses.gml"
    write_layer(
        written,
        {"nummer": pa.array(["4a", "5"]), "strasse": pa.array([GERMAN, "Hauptstraße"])},
        [shapely.Point(500_000, 5_540_000), shapely.Point(500_100, 5_540_100)],
        "Point",
        "EPSG:25832",
        driver="GML",
    )
    path = written.rename(tmp_path / f"addresses{suffix}")
    reader, table = read_all(path, {"format": "xml"})
    assert {"nummer", "strasse"} <= set(reader.fields)
    assert reader.crs is not None and reader.crs.to_epsg() == 25832
    assert table.column("nummer").to_pylist() == ["4a", "5"]
    assert table.column("strasse").to_pylist() == [GERMAN, "Hauptstraße"]
    point = shapely.from_wkb(table.column(GEOMETRY_COLUMN)[1].as_py())
    assert (point.x, point.y) == (500_100, 5_540_100)


@pytest.fixture
def two_layer_gpkg(tmp_path: Path) -> Path:
    path = tmp_path / "two.gpkg"
    write_layer(
        path, {"name": pa.array(["parcel"])}, [shapely.box(0, 0, 1, 1)], "Polygon", layer="parcels"
    )
    write_layer(
        path,
        {
            "num": pa.array([42], pa.int64()),
            "when": pa.array([dt.datetime(2024, 1, 31, 10, 30)], pa.timestamp("ms")),
        },
        [shapely.Point(5, 6)],
        "Point",
        layer="addresses",
        append=True,
    )
    return path


@pytest.mark.parametrize("layer", ["addresses", 1, "1"])
def test_gpkg_layer_by_name_or_index(two_layer_gpkg: Path, layer: str | int) -> None:
    reader, table = read_all(two_layer_gpkg, {"format": "gpkg", "layer": layer})
    assert reader.fields == ["num", "when"]
    assert reader.geometry_type == "Point"
    assert table.column("num").to_pylist() == ["42"]
    assert table.column("when").to_pylist()[0].startswith("2024-01-31T10:30:00")


def test_gpkg_first_layer_by_default(two_layer_gpkg: Path) -> None:
    reader, table = read_all(two_layer_gpkg, {"format": "gpkg"})
    assert reader.fields == ["name"]
    assert table.column("name").to_pylist() == ["parcel"]


def test_gpkg_missing_layer_names_the_layers(two_layer_gpkg: Path) -> None:
    with pytest.raises(RunError) as raised:
        open_reader(two_layer_gpkg, {"format": "gpkg", "layer": "nope"})
    assert raised.value.problem == "conform_failed"
    assert "parcels" in str(raised.value) and "addresses" in str(raised.value)


def test_file_geodatabase(tmp_path: Path) -> None:
    path = tmp_path / "addresses_oregon.gdb"
    write_layer(
        path,
        {"HOUSE": pa.array([101, 102], pa.int32()), "FLAG": pa.array([True, False])},
        [shapely.Point(-121.1, 44.6), shapely.Point(-121.2, 44.7)],
        "Point",
        driver="OpenFileGDB",
        layer="Jefferson",
    )
    write_layer(
        path,
        {"OTHER": pa.array(["x"])},
        [shapely.Point(0, 1)],
        "Point",
        driver="OpenFileGDB",
        layer="Other",
        append=True,
    )
    assert path.is_dir()
    reader, table = read_all(path, {"format": "gdb", "layer": "Jefferson"})
    assert reader.fields[:1] == ["HOUSE"]
    assert table.column("HOUSE").to_pylist() == ["101", "102"]
    assert table.column("FLAG").to_pylist() == ["1", "0"]
    lon, lat = lonlat_from_wkb(table.column(GEOMETRY_COLUMN).combine_chunks(), reader.crs)
    np.testing.assert_allclose(lon, [-121.1, -121.2])
    np.testing.assert_allclose(lat, [44.6, 44.7])


def test_ogr_batches_respect_batch_rows(tmp_path: Path) -> None:
    path = tmp_path / "many.gpkg"
    count = 2500
    write_layer(
        path,
        {"n": pa.array(range(count), pa.int64())},
        [shapely.Point(i % 180, 0) for i in range(count)],
        "Point",
    )
    with open_reader(path, {"format": "gpkg"}, batch_rows=1000) as reader:
        sizes = [batch.num_rows for batch in reader.batches()]
    assert sizes == [1000, 1000, 500]


def test_corrupt_shapefile_fails_the_conform(tmp_path: Path) -> None:
    path = tmp_path / "broken.shp"
    path.write_bytes(b"this is not a shapefile" * 10)
    with pytest.raises(RunError) as raised:
        open_reader(path, {"format": "shapefile"})
    assert raised.value.problem == "conform_failed"
    assert "broken.shp" in str(raised.value)


def test_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(RunError) as raised:
        open_reader(tmp_path / "x.kml", {"format": "kml"})
    assert raised.value.problem == "unknown_format"
    assert "kml" in str(raised.value)


# -- CSV ----------------------------------------------------------------------------------


def write_csv(tmp_path: Path, text: str, encoding: str = "utf-8", name: str = "a.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def test_csv_basic_values_are_kept_as_text(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "id,number,lon,lat\n007,12.0,-122.5,37.7\n8,,1,2\n")
    reader, table = read_all(path, {"format": "csv"})
    assert reader.fields == ["id", "number", "lon", "lat"]
    assert reader.crs is None and reader.geometry_type is None
    assert table.to_pylist() == [
        {"id": "007", "number": "12.0", "lon": "-122.5", "lat": "37.7"},
        {"id": "8", "number": "", "lon": "1", "lat": "2"},
    ]


@pytest.mark.parametrize("delimiter", [";", "|", "\t"])
def test_csvsplit(tmp_path: Path, delimiter: str) -> None:
    path = write_csv(tmp_path, f"a{delimiter}b\n1,5{delimiter}x y\n")
    _, table = read_all(path, {"format": "csv", "csvsplit": delimiter})
    assert table.to_pylist() == [{"a": "1,5", "b": "x y"}]


def test_headers_minus_one_names_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path, f"1|{KOREAN}|127.0\n2|종로|127.1\n", "cp949", "entrc_seoul.txt")
    reader, table = read_all(
        path, {"format": "csv", "headers": -1, "csvsplit": "|", "encoding": "CP949"}
    )
    assert reader.fields == ["COLUMN1", "COLUMN2", "COLUMN3"]
    assert table.column("COLUMN2").to_pylist() == [KOREAN, "종로"]
    assert table.column("COLUMN1").to_pylist() == ["1", "2"]


def test_headers_on_a_later_line(tmp_path: Path) -> None:
    text = "Title of the export\nname,number\nMain,1\n"
    path = write_csv(tmp_path, text)
    for conform in ({"headers": 2, "skiplines": 2}, {"headers": 2}, {"skiplines": 1}):
        reader, table = read_all(path, {"format": "csv", **conform})
        assert reader.fields == ["name", "number"], conform
        assert table.to_pylist() == [{"name": "Main", "number": "1"}]


def test_skiplines_without_header(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "junk\n1,2\n")
    reader, table = read_all(path, {"format": "csv", "headers": -1, "skiplines": 1})
    assert reader.fields == ["COLUMN1", "COLUMN2"]
    assert table.to_pylist() == [{"COLUMN1": "1", "COLUMN2": "2"}]


@pytest.mark.parametrize("encoding", [None, "utf-8", "utf-8-sig"])
def test_byte_order_mark_is_not_part_of_the_first_name(tmp_path: Path, encoding: str) -> None:
    path = write_csv(tmp_path, "\ufeffgwr_egid,hausnummer\n1,2a\n")
    conform = {"format": "csv"} if encoding is None else {"format": "csv", "encoding": encoding}
    reader, table = read_all(path, conform)
    assert reader.fields == ["gwr_egid", "hausnummer"]
    assert table.to_pylist() == [{"gwr_egid": "1", "hausnummer": "2a"}]


def test_quoted_newlines_and_quotes(tmp_path: Path) -> None:
    path = write_csv(tmp_path, 'a,b\n"line one\nline two","say ""hi"""\n3,4\n')
    _, table = read_all(path, {"format": "csv"})
    assert table.to_pylist() == [
        {"a": "line one\nline two", "b": 'say "hi"'},
        {"a": "3", "b": "4"},
    ]


@pytest.mark.parametrize(
    ("encoding", "text"),
    [("CP949", KOREAN), ("SHIFT_JISX0213", JAPANESE), ("ISO-8859-1", GERMAN)],
)
def test_encodings(tmp_path: Path, encoding: str, text: str) -> None:
    path = write_csv(tmp_path, f'名前,n\n"{text}",1\n'.replace("名前", "name"), encoding)
    with pytest.raises(UnicodeDecodeError):
        path.read_bytes().decode("utf-8")  # the test file really is not UTF-8
    _, table = read_all(path, {"format": "csv", "encoding": encoding})
    assert table.to_pylist() == [{"name": text, "n": "1"}]


def test_japanese_header_names(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "都道府県名,緯度,経度\n東京都,35.68,139.76\n", "shift_jisx0213")
    reader, table = read_all(path, {"format": "csv", "encoding": "SHIFT_JISX0213"})
    assert reader.fields == ["都道府県名", "緯度", "経度"]
    assert table.column("緯度").to_pylist() == ["35.68"]


def test_invalid_utf8_is_replaced_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_bytes(b"a,b\nok,1\nStra\xdfe,2\n")
    _, table = read_all(path, {"format": "csv"})
    assert table.column("a").to_pylist() == ["ok", "Stra\ufffde"]


def test_wrong_column_count_rows_are_skipped_and_counted(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "a,b\n1,2\n3,4,5\n6\n7,8\n")
    with open_reader(path, {"format": "csv"}) as reader:
        rows = pa.Table.from_batches(list(reader.batches())).to_pylist()
        assert isinstance(reader, CsvReader)
        assert reader.skipped_rows == 2
    assert rows == [{"a": "1", "b": "2"}, {"a": "7", "b": "8"}]


def test_absurdly_long_field(tmp_path: Path) -> None:
    huge = "x" * (10 * 1024 * 1024)
    path = write_csv(tmp_path, f'a,b\n1,short\n2,{huge}\n3,"quoted"\n')
    _, table = read_all(path, {"format": "csv"}, batch_rows=1024)
    values = table.column("b").to_pylist()
    assert table.column("a").to_pylist() == ["1", "2", "3"]
    assert values[0] == "short" and values[2] == "quoted"
    assert len(values[1]) == len(huge)


def test_csv_batches_respect_batch_rows(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "n\n" + "".join(f"{i}\n" for i in range(2500)))
    with open_reader(path, {"format": "csv"}, batch_rows=1000) as reader:
        batches = list(reader.batches())
    assert [b.num_rows for b in batches] == [1000, 1000, 500]
    assert batches[2].column(0).to_pylist()[-1] == "2499"


def test_empty_csv_has_no_fields_and_no_batches(tmp_path: Path) -> None:
    reader, table = read_all(write_csv(tmp_path, ""), {"format": "csv"})
    assert reader.fields == [] and table.num_rows == 0


def test_unknown_encoding_fails_the_conform(tmp_path: Path) -> None:
    with pytest.raises(RunError) as raised:
        open_reader(write_csv(tmp_path, "a\n1\n"), {"format": "csv", "encoding": "klingon"})
    assert raised.value.problem == "conform_failed"


def test_layers_listed_by_pyogrio_match_what_we_wrote(two_layer_gpkg: Path) -> None:
    # Guards the fixture itself: two layers, in this order.
    assert [str(n) for n in pyogrio.list_layers(two_layer_gpkg)[:, 0]] == ["parcels", "addresses"]


def test_restarts_mid_file_neither_repeat_nor_lose_rows(tmp_path: Path) -> None:
    # 3 MiB of ordinary rows, then a bad row, a 5 MiB cell and a Latin-1 byte: the reader has
    # to reopen the file twice (bigger block, then lenient decoding) after handing out rows.
    lines = [f"{i},street {i}" for i in range(150_000)]
    body = "\n".join(lines).encode()
    tail = b"\nbad,row,here\n150000," + b"y" * (5 << 20) + b"\n150001,Stra\xdfe\n"
    path = tmp_path / "restart.csv"
    path.write_bytes(b"n,street\n" + body + tail)
    with open_reader(path, {"format": "csv"}) as reader:
        numbers: list[str] = []
        last: list[str] = []
        for batch in reader.batches():
            numbers.extend(batch.column("n").to_pylist())
            last = batch.column("street").to_pylist()
        assert isinstance(reader, CsvReader)
        assert reader.skipped_rows == 1
    assert numbers == [str(i) for i in range(150_002)]
    assert last[-1] == "Stra\ufffde"


def test_reals_read_from_ogr_print_like_python() -> None:
    rng = np.random.default_rng(11)
    values = np.concatenate(
        [
            rng.uniform(-1, 1, 5000) * 10.0 ** rng.integers(-8, 18, 5000),
            np.round(rng.uniform(-1e6, 1e6, 1000)),
            [0.0, 1e16, 1e-5, 123456789012.5, np.nan, np.inf],
        ]
    )
    text = to_strings(pa.array(values)).to_pylist()
    assert text == [str(v) for v in values.tolist()]
    assert to_strings(pa.array([12.3, None], pa.float32())).to_pylist() == ["12.3", None]
    assert to_strings(pa.array([True, None, False])).to_pylist() == ["1", None, "0"]

"""OutputWriter: the files it writes, read back with json, csv, zipfile and GDAL."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyogrio
import pytest
import shapely

from services.worker.conform.arrays import count_filled as _count_filled
from services.worker.conform.hashing import hash_rows
from services.worker.conform.layers import CSV_HEADER, LAYER_ATTRIBUTES
from services.worker.conform.writers import (
    OutputWriter,
    _use_isal,
    archive_base,
    csv_field,
    format_coordinates,
    json_string,
)

TRICKY = [
    "MAIN ST",
    'Rue de l\'Église, "Nord"',
    "line\nbreak",
    "carriage\rreturn",
    "back\\slash\ttab",
    "bell\x07char",
    "東京都",
    None,
]


def address_batch(
    number: list[str | None], street: list[str | None], lon: list[float], lat: list[float]
) -> pa.RecordBatch:
    count = len(number)
    attributes: dict[str, pa.Array] = {
        name: pa.nulls(count, pa.string()) for name in LAYER_ATTRIBUTES["addresses"]
    }
    attributes["number"] = pa.array(number, pa.string())
    attributes["street"] = pa.array(street, pa.string())
    attributes["id"] = pa.array([f"id-{n}" for n in number], pa.string())
    lon_array, lat_array = np.array(lon), np.array(lat)
    hashes = hash_rows(attributes, (lon_array, lat_array))
    return pa.RecordBatch.from_pydict(
        {**attributes, "hash": hashes, "lon": lon_array, "lat": lat_array}
    )


def write_addresses(outdir: Path, batches: list[pa.RecordBatch], source: str = "us/ks/lane"):
    attribution = {"website": "https://lane.example", "license": {"text": "CC-BY 4.0"}}
    with OutputWriter(outdir, "addresses", source_name=source, attribution=attribution) as writer:
        for batch in batches:
            writer.write(batch)
        return writer.close()


@pytest.fixture
def tricky_batch() -> pa.RecordBatch:
    count = len(TRICKY)
    return address_batch(
        number=[str(i + 1) for i in range(count)],
        street=TRICKY,
        lon=[-122.4194155, 1.0, 0.0, 0.00005, -0.1234567, 179.9999999, 12.5, -45.0][:count],
        lat=[37.7749, 2.0, 0.0, -0.00001, 51.5, -89.9999999, 0.25, 10.0][:count],
    )


# --- out.geojson ---------------------------------------------------------------------------------


def test_geojson_lines_parse_with_properties_and_points(
    tmp_path: Path, tricky_batch: pa.RecordBatch
) -> None:
    summary = write_addresses(tmp_path, [tricky_batch])
    lines = (tmp_path / "out.geojson").read_text(encoding="utf-8").splitlines()
    features = [json.loads(line) for line in lines]
    assert len(features) == len(TRICKY)
    assert summary.files["out.geojson"] == tmp_path / "out.geojson"
    for feature, street, hash_ in zip(
        features, TRICKY, tricky_batch.column("hash").to_pylist(), strict=True
    ):
        assert feature["type"] == "Feature"
        assert list(feature["properties"]) == [*LAYER_ATTRIBUTES["addresses"], "hash"]
        assert feature["properties"]["street"] == (street or "")
        assert feature["properties"]["unit"] == ""
        assert feature["properties"]["hash"] == hash_
        assert feature["geometry"]["type"] == "Point"
    assert features[0]["geometry"]["coordinates"] == [-122.4194155, 37.7749]
    assert features[3]["geometry"]["coordinates"] == [0.00005, -0.00001]


def test_json_string_matches_json_dumps() -> None:
    literals = json_string(pa.array(TRICKY)).to_pylist()
    assert [json.loads(v) for v in literals] == [v or "" for v in TRICKY]
    assert literals[6] == '"東京都"'  # UTF-8 kept, not \\u-escaped


def test_other_layers_keep_their_wkb_geometry(tmp_path: Path) -> None:
    polygons = [shapely.box(0, 0, 1, 1), shapely.box(2, 2, 3, 4)]
    batch = pa.RecordBatch.from_pydict(
        {
            "pid": pa.array(["P1", None]),
            "hash": pa.array(["0" * 16, "1" * 16]),
            "__geometry__": pa.array(shapely.to_wkb(polygons).tolist(), pa.binary()),
        }
    )
    with OutputWriter(tmp_path, "parcels", source_name="us/ks/lane", attribution={}) as writer:
        writer.write(batch)
        summary = writer.close()
    features = [json.loads(line) for line in (tmp_path / "out.geojson").open(encoding="utf-8")]
    assert [f["properties"] for f in features] == [
        {"pid": "P1", "hash": "0" * 16},
        {"pid": "", "hash": "1" * 16},
    ]
    assert shapely.equals(shapely.from_geojson(json.dumps(features[1]["geometry"])), polygons[1])
    assert summary.geometry_type == "Polygon"
    assert summary.bounds == (0.0, 0.0, 3.0, 4.0)
    assert summary.attribute_counts == {"pid": 1}
    assert set(summary.files) == {"out.geojson", "preview.png"}


# --- out.csv -------------------------------------------------------------------------------------


def test_csv_header_crlf_and_quoting_read_back(
    tmp_path: Path, tricky_batch: pa.RecordBatch
) -> None:
    write_addresses(tmp_path, [tricky_batch])
    raw = (tmp_path / "out.csv").read_bytes()
    assert raw.startswith(b"LON,LAT,NUMBER,STREET,UNIT,CITY,DISTRICT,REGION,POSTCODE,ID,HASH\r\n")
    assert raw.endswith(b"\r\n")
    # Every record ends in CRLF; the only bare LF/CR are inside the quoted values.
    assert raw.count(b"\r\n") == len(TRICKY) + 1
    with (tmp_path / "out.csv").open(encoding="utf-8", newline="") as file:
        rows = list(csv.reader(file))
    assert tuple(rows[0]) == CSV_HEADER
    assert [row[3] for row in rows[1:]] == [v or "" for v in TRICKY]
    assert rows[1][:3] == ["-122.4194155", "37.7749", "1"]
    assert rows[2][:2] == ["1", "2"]
    assert rows[4][:2] == ["5e-05", "-1e-05"]
    assert rows[1][10] == tricky_batch.column("hash")[0].as_py()


def test_csv_quoting_is_byte_identical_to_the_csv_module(
    tmp_path: Path, tricky_batch: pa.RecordBatch
) -> None:
    write_addresses(tmp_path, [tricky_batch])
    expected = io.StringIO(newline="")
    writer = csv.writer(expected, quoting=csv.QUOTE_MINIMAL, lineterminator="\r\n")
    writer.writerow(CSV_HEADER)
    data = tricky_batch.to_pydict()
    for i in range(tricky_batch.num_rows):
        row = [format(data["lon"][i], ".12g"), format(data["lat"][i], ".12g")]
        row += [data[name.lower()][i] or "" for name in CSV_HEADER[2:]]
        writer.writerow(row)
    assert (tmp_path / "out.csv").read_bytes() == expected.getvalue().encode("utf-8")


def test_csv_field_quotes_only_what_needs_it() -> None:
    fields = csv_field(pa.array(["plain", "a,b", 'say "hi"', "x\ny", None])).to_pylist()
    # A null stays null: the writer's joins write it as an empty field.
    assert fields == ["plain", '"a,b"', '"say ""hi"""', '"x\ny"', None]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (-122.4194155, "-122.4194155"),
        (1.0, "1"),
        (0.0, "0"),
        (44.05, "44.05"),
        (-0.1234567, "-0.1234567"),
        (0.00005, "5e-05"),
        (180.0, "180"),
        (1.23456789012345, "1.23456789012"),
        (0.0001, "0.0001"),
        (-0.0000999, "-9.99e-05"),
        (0.0000001, "1e-07"),
        (999.9999999, "999.9999999"),
        (1000.0, "1000"),
        (-1234.5678901, "-1234.5678901"),
        (-0.0, "-0"),
    ],
)
def test_coordinates_print_as_percent_12g(value: float, text: str) -> None:
    assert format_coordinates(np.array([value])).to_pylist() == [text]
    assert text == "%.12g" % value  # noqa: UP031 - the reference format itself


def test_coordinates_match_percent_12g_over_a_random_grid() -> None:
    rng = np.random.default_rng(3)
    values = np.concatenate([
        np.round(rng.uniform(-180, 180, 20_000), 7),
        # every magnitude from 1e-8 to 1e4, on and off the 7-decimal grid
        np.round(10 ** rng.uniform(-8, 4, 20_000) * rng.choice([-1, 1], 20_000), 7),
        10 ** rng.uniform(-8, 4, 5_000),
        rng.integers(-1000, 1000, 2_000).astype(np.float64),
    ])
    assert format_coordinates(values).to_pylist() == [format(v, ".12g") for v in values]


def test_coordinates_that_are_no_number_are_empty() -> None:
    assert format_coordinates(np.array([np.nan, np.inf, -np.inf, 1.5])).to_pylist() == [
        "", "", "", "1.5"]


# --- processed.zip -------------------------------------------------------------------------------


def test_zip_members_readme_and_csv_copy(tmp_path: Path, tricky_batch: pa.RecordBatch) -> None:
    summary = write_addresses(tmp_path, [tricky_batch], source="us/ks/lane_county")
    with zipfile.ZipFile(summary.files["processed.zip"]) as archive:
        assert archive.namelist() == [
            "README.txt",
            "us/ks/lane_county.vrt",
            "us/ks/lane_county.csv",
        ]
        assert archive.testzip() is None
        assert archive.read("us/ks/lane_county.csv") == (tmp_path / "out.csv").read_bytes()
        readme = archive.read("README.txt").decode("utf-8")
    assert "us/ks/lane_county" in readme
    assert "https://lane.example" in readme
    assert "CC-BY 4.0" in readme


def test_zip_members_are_dated_when_the_run_wrote_them(
    tmp_path: Path, tricky_batch: pa.RecordBatch
) -> None:
    # Zip dates have a two-second resolution and no zone; ours are UTC.
    before = dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0) - dt.timedelta(seconds=2)
    summary = write_addresses(tmp_path, [tricky_batch])
    after = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    with zipfile.ZipFile(summary.files["processed.zip"]) as archive:
        members = archive.infolist()
    assert len(members) == 3
    for member in members:
        assert before <= dt.datetime(*member.date_time) <= after, member
        assert member.compress_type == zipfile.ZIP_DEFLATED
        assert member.external_attr >> 16 == 0o644


def test_zip_of_many_batches_is_deflated_and_reads_back_with_zlib(tmp_path: Path) -> None:
    # Several MB over many batches: the CSV member is deflated by ISA-L as it streams, and
    # zlib (zipfile's reader, independent of ISA-L) must get every byte back, CRC checked.
    rng = np.random.default_rng(7)
    batches = []
    for start in range(0, 60_000, 8_192):
        count = min(8_192, 60_000 - start)
        batches.append(address_batch(
            number=[str(start + i) for i in range(count)],
            street=[f"{rng.integers(1, 99)} STREET {i % 17}" for i in range(count)],
            lon=np.round(rng.uniform(-180, 180, count), 7).tolist(),
            lat=np.round(rng.uniform(-90, 90, count), 7).tolist(),
        ))
    summary = write_addresses(tmp_path, batches)
    csv_bytes = (tmp_path / "out.csv").read_bytes()
    assert len(csv_bytes) > 2_000_000
    with zipfile.ZipFile(summary.files["processed.zip"]) as archive:
        assert archive.testzip() is None
        member = archive.getinfo("us/ks/lane.csv")
        assert member.compress_type == zipfile.ZIP_DEFLATED
        assert member.compress_size < member.file_size / 1.5
        assert archive.read(member) == csv_bytes


def test_zip_member_compressor_is_isal(tmp_path: Path) -> None:
    # The hook into zipfile is a private attribute: a Python that renames it must be noticed
    # (the zip would stay correct, only ~4x slower to write).
    with zipfile.ZipFile(tmp_path / "x.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("member.csv", "w") as member:
            _use_isal(member)
            assert "isal" in type(member._compressor).__module__  # type: ignore[attr-defined]
            member.write(b"a,b\r\n" * 1000)
    with zipfile.ZipFile(tmp_path / "x.zip") as archive:
        assert archive.read("member.csv") == b"a,b\r\n" * 1000


def test_vrt_opens_the_csv_as_points_with_gdal(
    tmp_path: Path, tricky_batch: pa.RecordBatch
) -> None:
    summary = write_addresses(tmp_path, [tricky_batch], source="us/ks/lane_county")
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(summary.files["processed.zip"]) as archive:
        archive.extractall(unpacked)
    vrt = unpacked / "us/ks/lane_county.vrt"
    info = pyogrio.read_info(vrt, force_feature_count=True)
    assert info["geometry_type"] == "Point"
    assert info["crs"] == "EPSG:4326"
    assert info["features"] == len(TRICKY)
    meta, _, geometry, fields = pyogrio.raw.read(vrt)
    points = shapely.from_wkb(geometry)
    assert shapely.get_x(points[0]) == pytest.approx(-122.4194155)
    assert shapely.get_y(points[0]) == pytest.approx(37.7749)
    street = list(meta["fields"]).index("STREET")
    # GDAL's CSV reader turns a bare CR inside a quoted value into LF (Python's csv keeps it).
    assert list(fields[street]) == [(v or "").replace("\r", "\n") for v in TRICKY]


def test_archive_base_keeps_the_source_path() -> None:
    assert archive_base("us/ks/lane_county") == "us/ks/lane_county"
    assert archive_base("sources/us/ks/lane_county.json") == "us/ks/lane_county"
    assert archive_base("../../etc/passwd") == "etc/passwd"


def test_failed_run_removes_the_partial_zip(tmp_path: Path, tricky_batch: pa.RecordBatch) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with OutputWriter(tmp_path, "addresses", source_name="x", attribution={}) as writer:
            writer.write(tricky_batch)
            raise RuntimeError("boom")
    assert not (tmp_path / "processed.zip").exists()


# --- stats and memory ----------------------------------------------------------------------------


def test_stats_accumulate_over_batches(tmp_path: Path) -> None:
    first = address_batch(["1", None], ["A ST", "B ST"], [-1.5, 2.0], [10.0, -3.25])
    second = address_batch(["3"], [None], [7.0], [0.5])
    summary = write_addresses(tmp_path, [first, second])
    assert summary.feature_count == 3
    assert summary.geometry_type == "Point"
    assert summary.bounds == (-1.5, -3.25, 7.0, 10.0)
    assert summary.attribute_counts["number"] == 2
    assert summary.attribute_counts["street"] == 2
    assert summary.attribute_counts["id"] == 3
    assert summary.attribute_counts["unit"] == 0
    assert set(summary.files) == {"out.geojson", "out.csv", "processed.zip", "preview.png"}


def test_no_features_means_no_preview_and_a_header_only_csv(tmp_path: Path) -> None:
    summary = write_addresses(tmp_path, [])
    assert summary.feature_count == 0
    assert summary.bounds is None
    assert summary.geometry_type is None
    assert "preview.png" not in summary.files
    assert (tmp_path / "out.csv").read_bytes() == (",".join(CSV_HEADER) + "\r\n").encode()
    assert (tmp_path / "out.geojson").read_bytes() == b""


def test_batch_split_does_not_change_the_files(
    tmp_path: Path, tricky_batch: pa.RecordBatch
) -> None:
    write_addresses(tmp_path / "one", [tricky_batch])
    write_addresses(
        tmp_path / "three",
        [tricky_batch.slice(0, 3), tricky_batch.slice(3, 2), tricky_batch.slice(5)],
    )
    for name in ("out.csv", "out.geojson"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes()


def test_error_after_close_keeps_the_finished_outputs(
    tmp_path: Path, tricky_batch: pa.RecordBatch
) -> None:
    with pytest.raises(RuntimeError, match="later"):
        with OutputWriter(tmp_path, "addresses", source_name="x", attribution={}) as writer:
            writer.write(tricky_batch)
            summary = writer.close()
            raise RuntimeError("later")
    assert summary.files["processed.zip"].exists()


def test_a_failing_disk_write_surfaces_in_the_caller(
    tmp_path: Path, tricky_batch: pa.RecordBatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = OutputWriter(tmp_path, "parcels", source_name="x", attribution={})

    def fail(data: object) -> int:
        raise OSError("disk full")

    monkeypatch.setattr(writer._files[0], "write", fail)  # out.geojson's handle
    batch = pa.RecordBatch.from_pydict(
        {
            "pid": pa.array(["P1"]),
            "hash": pa.array(["0" * 16]),
            "__geometry__": pa.nulls(1, pa.binary()),
        }
    )
    writer.write(batch)
    with pytest.raises(OSError, match="disk full"):
        writer.close()


@pytest.mark.parametrize(
    "values",
    [
        pa.array(["a", "", None, "bc", None, "", "d"]),
        pa.array(["a", "", None, "bc", None, "", "d"])[2:6],
        pa.array([None, None], pa.string()),
        pa.array([], pa.string()),
        pa.array(["", ""]),
        pa.array(["Élysée", "x"]),
        # a null slot that still spans bytes (legal in Arrow): it must not count
        pa.Array.from_buffers(
            pa.string(), 3,
            [pa.py_buffer(np.packbits([1, 0, 1], bitorder="little")),
             pa.py_buffer(np.array([0, 1, 3, 4], dtype=np.int32)), pa.py_buffer(b"abcd")],
        ),
    ],
)
def test_count_filled_is_non_null_non_empty(values: pa.Array) -> None:
    expected = sum(1 for v in values.to_pylist() if v)
    assert _count_filled(values) == expected

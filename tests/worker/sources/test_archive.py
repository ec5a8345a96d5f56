"""Unpacking: compression, nesting, member choice, and refusing hostile archives."""

from __future__ import annotations

import gzip
import io
import stat
import zipfile
from pathlib import Path
from typing import Any

import pytest

from services.worker.errors import RunError
from services.worker.sources import archive
from services.worker.sources.archive import detect_compression, unpack

LIMIT = 10_000_000
CSV = b"number,street\n1,Main St\n"


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def run(download: Path, tmp_path: Path, conform: dict[str, Any], **options: Any) -> Path:
    options.setdefault("compression", None)
    options.setdefault("max_unpacked_bytes", LIMIT)
    return unpack(download, conform, tmp_path / "work", **options)


def test_plain_file_is_returned_as_is(tmp_path: Path) -> None:
    download = tmp_path / "download.csv"
    download.write_bytes(CSV)
    assert run(download, tmp_path, {"format": "csv"}) == download


def test_zip_first_member_fitting_the_format(tmp_path: Path) -> None:
    download = make_zip(
        tmp_path / "download.zip", {"README.txt": b"hi", "b.csv": CSV, "a.csv": b"other"}
    )
    got = run(download, tmp_path, {"format": "csv"}, compression="zip")
    assert got.name == "b.csv" and got.read_bytes() == CSV


def test_gzip(tmp_path: Path) -> None:
    download = tmp_path / "addresses.csv.gz"
    download.write_bytes(gzip.compress(CSV))
    got = run(download, tmp_path, {"format": "csv"}, compression="gzip")
    assert got.name == "addresses.csv" and got.read_bytes() == CSV


def test_gzip_without_a_telling_name_is_named_by_format(tmp_path: Path) -> None:
    download = tmp_path / "download.bin"
    download.write_bytes(gzip.compress(b'{"type":"FeatureCollection","features":[]}'))
    got = run(download, tmp_path, {"format": "geojson"})
    assert got.name == "data.geojson"


def test_compression_is_guessed_from_magic_bytes(tmp_path: Path) -> None:
    zipped = make_zip(tmp_path / "download.bin", {"x.csv": CSV})
    gzipped = tmp_path / "download.gz.bin"
    gzipped.write_bytes(gzip.compress(CSV))
    assert detect_compression(zipped) == "zip" and detect_compression(gzipped) == "gzip"
    assert run(zipped, tmp_path / "1", {"format": "csv"}).read_bytes() == CSV
    assert run(gzipped, tmp_path / "2", {"format": "csv"}).read_bytes() == CSV


def test_nested_zip_and_gz_inside_zip(tmp_path: Path) -> None:
    inner = zip_bytes({"data/inner.csv": CSV})
    download = make_zip(
        tmp_path / "download.zip",
        {"readme.txt": b"x", "inner.zip": inner, "more/extra.csv.gz": gzip.compress(b"a\n")},
    )
    got = run(download, tmp_path, {"format": "csv"})
    assert got.read_bytes() == CSV and got.parts[-3:] == ("inner", "data", "inner.csv")
    extra = run(download, tmp_path / "2", {"format": "csv", "file": "more/extra.csv"})
    assert extra.read_bytes() == b"a\n"


def test_file_picks_member_case_insensitively_in_nested_folders(tmp_path: Path) -> None:
    download = make_zip(
        tmp_path / "download.zip", {"Top/Data/Sub/Addr.CSV": CSV, "Top/other.csv": b"no"}
    )
    exact = run(download, tmp_path / "1", {"format": "csv", "file": "top/data/sub/addr.csv"})
    assert exact.read_bytes() == CSV
    # Named without the top folder, as sources often do.
    short = run(download, tmp_path / "2", {"format": "csv", "file": "Data\\Sub\\addr.csv"})
    assert short.read_bytes() == CSV


def test_file_not_in_archive(tmp_path: Path) -> None:
    download = make_zip(tmp_path / "download.zip", {"a.csv": CSV})
    with pytest.raises(RunError) as caught:
        run(download, tmp_path, {"format": "csv", "file": "b.csv"})
    assert caught.value.problem == "download_failed" and "a.csv" in str(caught.value)


def test_shapefile_brings_its_siblings_with_matching_names(tmp_path: Path) -> None:
    download = make_zip(
        tmp_path / "download.zip",
        {
            "__MACOSX/shp/._Roads.shp": b"resource fork",
            "shp/Roads.SHP": b"shp",
            "shp/roads.DBF": b"dbf",
            "shp/ROADS.shx": b"shx",
            "shp/Roads.prj": b"prj",
            "shp/roads.cpg": b"UTF-8",
            "shp/other.dbf": b"x",
        },
    )
    got = run(download, tmp_path, {"format": "shapefile"})
    assert got.name == "Roads.shp" and got.read_bytes() == b"shp"
    for suffix, body in ((".dbf", b"dbf"), (".shx", b"shx"), (".prj", b"prj"), (".cpg", b"UTF-8")):
        assert got.with_suffix(suffix).read_bytes() == body
    by_file = run(download, tmp_path / "2", {"format": "shapefile", "file": "shp/roads.shp"})
    assert by_file.with_suffix(".dbf").exists()


def test_gdb_picks_the_folder(tmp_path: Path) -> None:
    download = make_zip(
        tmp_path / "download.zip",
        {
            "export/Parcels.gdb/a00000001.gdbtable": b"t",
            "export/Parcels.gdb/gdb": b"g",
        },
    )
    got = run(download, tmp_path / "1", {"format": "gdb"})
    assert got.is_dir() and got.name == "Parcels.gdb"
    named = run(download, tmp_path / "2", {"format": "gdb", "file": "export/parcels.gdb/"})
    assert named.is_dir() and (named / "gdb").exists()


def test_no_member_fits_the_format(tmp_path: Path) -> None:
    download = make_zip(tmp_path / "download.zip", {"a.txt": b"x"})
    with pytest.raises(RunError) as caught:
        run(download, tmp_path, {"format": "shapefile"})
    assert caught.value.problem == "unknown_format" and ".shp" in str(caught.value)


def test_truncated_zip_is_a_clear_error(tmp_path: Path) -> None:
    whole = zip_bytes({"a.csv": CSV * 100})
    download = tmp_path / "download.zip"
    download.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(RunError) as caught:
        run(download, tmp_path, {"format": "csv"}, compression="zip")
    assert caught.value.problem == "download_failed"
    assert "truncated or corrupt" in str(caught.value)
    assert not caught.value.over_limit  # a broken archive is worth keeping to look at


def test_corrupt_member_data_is_a_clear_error(tmp_path: Path) -> None:
    data = bytearray(zip_bytes({"a.csv": bytes(range(256)) * 200}))
    data[60:90] = bytes(30)  # damage the compressed stream, keep the directory intact
    download = tmp_path / "download.zip"
    download.write_bytes(bytes(data))
    with pytest.raises(RunError, match="truncated or corrupt"):
        run(download, tmp_path, {"format": "csv"})


def test_truncated_gzip_is_a_clear_error(tmp_path: Path) -> None:
    whole = gzip.compress(bytes(range(256)) * 1000)
    download = tmp_path / "download.csv.gz"
    download.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(RunError, match="truncated or corrupt"):
        run(download, tmp_path, {"format": "csv"})


def test_zip_bomb_is_refused(tmp_path: Path) -> None:
    download = make_zip(tmp_path / "download.zip", {"a.csv": bytes(5_000_000)})
    assert download.stat().st_size < 10_000
    with pytest.raises(RunError) as caught:
        run(download, tmp_path, {"format": "csv"}, max_unpacked_bytes=1_000_000)
    assert caught.value.problem == "download_failed" and "1000000 bytes" in str(caught.value)
    assert caught.value.over_limit  # so the run does not keep the bomb as its cache
    written = sum(p.stat().st_size for p in (tmp_path / "work").rglob("*") if p.is_file())
    assert written <= 1_000_000 + 1024 * 1024  # stopped within one block of the limit


def test_too_many_members_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive, "MAX_MEMBERS", 3)
    download = make_zip(tmp_path / "download.zip", {f"{i}.csv": CSV for i in range(4)})
    with pytest.raises(RunError, match="more than 3 members") as caught:
        run(download, tmp_path, {"format": "csv"})
    assert caught.value.problem == "download_failed" and caught.value.over_limit


def test_nested_bomb_counts_every_level(tmp_path: Path) -> None:
    inner = zip_bytes({"a.csv": bytes(600_000)})
    download = make_zip(tmp_path / "download.zip", {"one.zip": inner, "b.csv": bytes(600_000)})
    with pytest.raises(RunError, match="expands past") as caught:
        run(download, tmp_path, {"format": "csv"}, max_unpacked_bytes=1_000_000)
    assert caught.value.over_limit


@pytest.mark.parametrize(
    "name", ["../evil.csv", "ok/../../evil.csv", "/etc/evil.csv", "C:/evil.csv", "..\\evil.csv"]
)
def test_path_traversal_member_is_refused(tmp_path: Path, name: str) -> None:
    download = tmp_path / "download.zip"
    with zipfile.ZipFile(download, "w") as zf:
        zf.writestr(zipfile.ZipInfo(name), CSV)
    with pytest.raises(RunError) as caught:
        run(download, tmp_path, {"format": "csv"})
    assert caught.value.problem == "download_failed"
    assert not (tmp_path / "evil.csv").exists()


def test_symlink_member_is_refused(tmp_path: Path) -> None:
    download = tmp_path / "download.zip"
    link = zipfile.ZipInfo("data.csv")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(download, "w") as zf:
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(RunError, match="symbolic link"):
        run(download, tmp_path, {"format": "csv"})

"""`oa-machine process-one` as a real subprocess: local data, no broker, no database."""

from __future__ import annotations

import copy
import csv
import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path
from typing import Any

import pytest

from tests.worker import fidelity

ROOT = Path(__file__).resolve().parents[2]
OA_MACHINE = Path(sys.executable).parent / "oa-machine"
ISANTI = ROOT / "tests" / "fixtures" / "oa-sources" / "us" / "mn" / "isanti.json"


def process_one(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUN_", "LOG_"))}
    return subprocess.run(
        [str(OA_MACHINE), "process-one", *map(str, args)], env=env, capture_output=True,
        text=True, timeout=120, check=False, cwd=ROOT,
    )


def csv_source(tmp_path: Path, data: Path) -> Path:
    path = tmp_path / "sources" / "us" / "ks" / "dighton.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({
        "coverage": {"country": "us", "state": "ks", "city": "Dighton"},
        "schema": 2,
        "layers": {"addresses": [{
            "name": "city", "data": data.as_uri(), "protocol": "http",
            "conform": {"format": "csv", "lon": "LON", "lat": "LAT", "number": "NUM",
                        "street": "STR", "city": "CITY"},
        }]},
    }))
    return path


def out_rows(outdir: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO((outdir / "out.csv").read_text())))


def test_local_csv_source_succeeds(tmp_path: Path) -> None:
    data = tmp_path / "dighton.csv"
    data.write_text("NUM,STR,CITY,LON,LAT\n"
                    "12,Main St,Dighton,-100.4661,38.4817\n"
                    "14.0, Main St ,Dighton,-100.4663,38.4819\n"
                    "16,Main St,Dighton,,\n")
    source = csv_source(tmp_path, data)
    outdir = tmp_path / "out"
    result = process_one(source, outdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(outdir / "index.json")
    index = json.loads((outdir / "index.json").read_text())
    assert index["source"] == "us/ks/dighton"
    assert (index["layer"], index["name"]) == ("addresses", "city")
    assert index["source problem"] is None and index["feature count"] == 2
    rows = out_rows(outdir)
    assert rows[0][:9] == ["LON", "LAT", "NUMBER", "STREET", "UNIT", "CITY", "DISTRICT",
                           "REGION", "POSTCODE"]
    assert [r[:6] for r in rows[1:]] == [
        ["-100.4661", "38.4817", "12", "Main St", "", "Dighton"],
        ["-100.4663", "38.4819", "14", "Main St", "", "Dighton"],
    ]


def test_failing_source_exits_1_with_the_problem_in_index_json(tmp_path: Path) -> None:
    source = csv_source(tmp_path, tmp_path / "missing.csv")
    outdir = tmp_path / "out"
    result = process_one(source, outdir)
    assert result.returncode == 1
    assert result.stdout.strip() == str(outdir / "index.json")
    assert "failed (download_failed)" in result.stderr
    index = json.loads((outdir / "index.json").read_text())
    assert index["source problem"] == "download_failed"
    assert "missing.csv" in index["error"]
    assert not (outdir / "out.csv").exists()


def test_rows_without_coordinates_only_fail_with_no_features(tmp_path: Path) -> None:
    data = tmp_path / "empty.csv"
    data.write_text("NUM,STR,CITY,LON,LAT\n12,Main St,Dighton,,\n")
    outdir = tmp_path / "out"
    result = process_one(csv_source(tmp_path, data), outdir)
    assert result.returncode == 1
    assert json.loads((outdir / "index.json").read_text())["source problem"] == "no_features"


def isanti_like(tmp_path: Path) -> Path:
    """The shape of the real Isanti County source, pointed at made-up local GeoJSON."""
    def feature(lon: float, lat: float, **properties: Any) -> dict[str, Any]:
        return {"type": "Feature", "properties": properties,
                "geometry": {"type": "Point", "coordinates": [lon, lat]}}

    points = tmp_path / "address_points.geojson"
    points.write_text(json.dumps({"type": "FeatureCollection", "features": [
        feature(-93.29, 45.56, ANUMBER="1", FULL_STREET="First Ave", SUB_ID1="",
                POSTCOMM="Cambridge", ZIP="55008", ADD_ID="p1"),
    ]}))
    parcels = tmp_path / "parcels.geojson"
    parcels.write_text(json.dumps({"type": "FeatureCollection", "features": [
        feature(-93.21, 45.57, SITEADDRESS="101 Main St N", PSTLCITY="Cambridge",
                PSTLZIP5="55008", PARCELID="A-1"),
        feature(-93.22, 45.58, SITEADDRESS="2250 Birch Lane", PSTLCITY="Isanti",
                PSTLZIP5="55040", PARCELID="A-2"),
    ]}))
    source = copy.deepcopy(json.loads(ISANTI.read_text()))
    first, second = source["layers"]["addresses"]
    for entry, data in ((first, points), (second, parcels)):
        entry.update(data=data.as_uri(), protocol="http")
    path = tmp_path / "sources" / "us" / "mn" / "isanti.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(source))
    return path


def test_layer_and_name_pick_the_second_entry(tmp_path: Path) -> None:
    source = isanti_like(tmp_path)
    outdir = tmp_path / "parcels-out"
    result = process_one(source, outdir, "--layer", "addresses", "--name", "parcels")
    assert result.returncode == 0, result.stderr
    index = json.loads((outdir / "index.json").read_text())
    assert (index["source"], index["name"], index["feature count"]) == (
        "us/mn/isanti", "parcels", 2)
    rows = out_rows(outdir)
    header = rows[0]
    picked = [{name: row[header.index(name)]
               for name in ("NUMBER", "STREET", "CITY", "POSTCODE", "ID")} for row in rows[1:]]
    assert picked == [
        {"NUMBER": "101", "STREET": "Main St N", "CITY": "Cambridge", "POSTCODE": "55008",
         "ID": "A-1"},
        {"NUMBER": "2250", "STREET": "Birch Lane", "CITY": "Isanti", "POSTCODE": "55040",
         "ID": "A-2"},
    ]


def test_without_name_the_first_entry_runs(tmp_path: Path) -> None:
    source = isanti_like(tmp_path)
    outdir = tmp_path / "first-out"
    result = process_one(source, outdir)
    assert result.returncode == 0, result.stderr
    index = json.loads((outdir / "index.json").read_text())
    assert (index["name"], index["feature count"]) == ("address_points", 1)
    assert out_rows(outdir)[1][2:4] == ["1", "First Ave"]


def test_unknown_layer_or_name_exits_1_before_running(tmp_path: Path) -> None:
    source = isanti_like(tmp_path)
    result = process_one(source, tmp_path / "a", "--layer", "buildings")
    assert result.returncode == 1
    assert "no entries in layer 'buildings'" in result.stderr
    assert not (tmp_path / "a").exists()
    result = process_one(source, tmp_path / "b", "--name", "no_such_entry")
    assert result.returncode == 1
    assert "no_such_entry" in result.stderr
    assert not (tmp_path / "b").exists()


def test_every_fidelity_gap_of_the_real_sources_runs(tmp_path: Path) -> None:
    # Duplicate entry names, X/Y from a shapefile without .prj, a chain variable read by its
    # plain name and get on a list (tests/worker/fidelity.py).
    data = tmp_path / "addresses.zip"
    data.write_bytes(fidelity.shapefile_zip(tmp_path))
    path = tmp_path / "sources" / "us" / "oh" / "city_of_perrysburg.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(fidelity.source(data.as_uri())))
    outdir = tmp_path / "out"
    result = process_one(path, outdir, "--name", "city[1]")
    assert result.returncode == 0, result.stderr
    index = json.loads((outdir / "index.json").read_text())
    fidelity.check_outputs((outdir / "out.csv").read_text(), index)
    assert index["source"] == "us/oh/city_of_perrysburg"


# --- the demo sources -----------------------------------------------------------------------------

DEMO_SOURCES = sorted((ROOT / "services" / "demo" / "sources").rglob("*.json"))


def test_there_are_demo_sources() -> None:
    assert [path.name for path in DEMO_SOURCES] == ["harbor_town.json", "river_city.json"]


@pytest.mark.parametrize("source", DEMO_SOURCES, ids=lambda path: path.stem)
def test_each_demo_source_runs_as_it_is(source: Path, tmp_path: Path) -> None:
    # {data_url} in the source stands for the bundled demo data by default.
    result = process_one(source, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    data_rows = len((ROOT / "services" / "demo" / "data" / f"{source.stem}.csv")
                    .read_text().splitlines()) - 1
    assert index["source problem"] is None
    assert index["feature count"] + index["dropped rows"] == data_rows > 0


def test_data_url_says_where_the_demo_data_is(tmp_path: Path) -> None:
    data = tmp_path / "elsewhere"
    data.mkdir()
    (data / "harbor_town.csv").write_text(
        "LON,LAT,NUM,STREET,CITY,ZIP\n-70.58,41.50,1,Harbor Road,Harbor Town,02540\n")
    source = ROOT / "services" / "demo" / "sources" / "zz" / "demo" / "harbor_town.json"
    result = process_one(source, tmp_path / "out", "--data-url", data.as_uri())
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "index.json").read_text())["feature count"] == 1


# --- progress -------------------------------------------------------------------------------------

HARBOR_TOWN = ROOT / "services" / "demo" / "sources" / "zz" / "demo" / "harbor_town.json"


def on_terminal(*args: str | Path) -> tuple[int, str]:
    """Run process-one with stdout and stderr on a pseudo-terminal (100 x 24); everything it
    wrote there, carriage returns as they came."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUN_", "LOG_"))}
    with subprocess.Popen(
        [str(OA_MACHINE), "process-one", *map(str, args)], env=env, cwd=ROOT,
        stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
    ) as process:
        os.close(slave)
        output = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            output += chunk
        os.close(master)
        code = process.wait(timeout=120)
    return code, output.decode()


def test_progress_on_a_terminal_and_a_last_line_with_the_counts(tmp_path: Path) -> None:
    code, output = on_terminal(HARBOR_TOWN, tmp_path / "out")
    assert code == 0, output
    screen = output.replace("\r\n", "\n").split("\n")
    # Each stage's line, as it was left: the last state drawn after its carriage returns.
    shown = {line.rsplit("\r", 1)[-1].split(":", 1)[0]: line.rsplit("\r", 1)[-1]
             for line in screen if line}
    assert re.fullmatch(r"download: 13\.8kB \[\d\d:\d\d, [\d.]+[kMG]?B/s\]", shown["download"])
    assert re.fullmatch(r"unpack: \d\d:\d\d", shown["unpack"])
    assert re.fullmatch(r"conform: 240 rows read \([\d.]+k?/s\), 240 conformed \([\d.]+k?/s\)",
                        shown["conform"])
    assert re.fullmatch(r"write: \d\d:\d\d", shown["write"])
    index = tmp_path / "out" / "index.json"
    state = json.loads(index.read_text())
    assert screen[-3:] == [
        str(index), f"240 features, 0 dropped rows, {state['process time']:.1f} s", ""]


def test_no_progress_through_a_pipe(tmp_path: Path) -> None:
    result = process_one(HARBOR_TOWN, tmp_path / "out")
    assert result.returncode == 0
    assert result.stdout == f"{tmp_path / 'out' / 'index.json'}\n"
    assert result.stderr == ""

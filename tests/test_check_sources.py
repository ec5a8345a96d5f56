"""`oa-machine check-sources`: a folder of good and bad source files, as a contributor has them.

The good files are real sources (tests/fixtures); each bad file is a real source with one
thing broken, so every line the command prints can be checked against the break that caused
it. The command runs as a real subprocess; the core function is checked for the structured
problems the webhook and the scheduler will read.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.checks import CheckReport, Problem, check_sources, check_text

ROOT = Path(__file__).resolve().parent.parent
OA_MACHINE = Path(sys.executable).parent / "oa-machine"
FIXTURES = ROOT / "tests" / "fixtures"
#: The real sources repository, where this machine has it (not on a fresh clone).
MIRROR = Path("/work/.mirror/openaddresses+openaddresses/repo")

GOOD = [
    "oa-sources/us/tx/city_of_mckinney.json",  # 4 acceptance tests
    "oa-sources/us/mn/isanti.json",  # two addresses entries
    "oa-sources/us/mo/dallas.json",  # skip: true, no conform
    "oa-sources/us/wi/marathon.json",  # four layers
    "oa-sources-gaps/us/pa/philadelphia.json",  # chain variable by name, 11 tests; parcels
    "oa-sources-gaps/us/oh/city_of_perrysburg.json",  # two entries named city
]


def check_sources_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUN_", "LOG_"))}
    return subprocess.run(
        [str(OA_MACHINE), "check-sources", *map(str, args)], env=env, capture_output=True,
        text=True, timeout=120, check=False, cwd=ROOT,
    )


def real(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def broken(change: Callable[[dict[str, Any]], None], name: str = GOOD[0]) -> str:
    source = copy.deepcopy(real(name))
    change(source)
    return json.dumps(source, indent=2)


def entry(source: dict[str, Any], index: int = 0) -> dict[str, Any]:
    return source["layers"]["addresses"][index]  # type: ignore[no-any-return]


def conform(source: dict[str, Any], index: int = 0) -> dict[str, Any]:
    return entry(source, index)["conform"]  # type: ignore[no-any-return]


#: file name -> (text, the lines check-sources must print for it, without the file name)
BAD: dict[str, tuple[str, list[str]]] = {
    "not_json.json": ('{"schema": 2,\n  "layers": }', [
        "invalid JSON at line 2 column 13: Expecting value",
    ]),
    "unknown_format.json": (
        broken(lambda s: conform(s).update(format="xlsx")),
        ["layers.addresses[0].conform.format: 'xlsx' is not one of ['csv', 'gdb', 'geojson', "
         "'gpkg', 'shapefile', 'shapefile-polygon', 'xml']"],
    ),
    "bad_pattern.json": (
        broken(lambda s: conform(s).update(
            number={"function": "regexp", "field": "ADDRESS", "pattern": "^([0-9]+"})),
        ["layers.addresses[0].conform.number: pattern '^([0-9]+' does not compile: "
         "missing ), unterminated subpattern at position 1"],
    ),
    "bad_chain_step.json": (
        broken(lambda s: conform(s).update(street={
            "function": "chain", "variable": "wip", "functions": [
                {"function": "postfixed_street", "field": "ADDRESS"},
                {"function": "regexp", "field": "wip", "pattern": "(x)", "replace": "$2"},
            ]})),
        ["layers.addresses[0].conform.street: chain step 2: replace '$2' refers to group '2', "
         "which the pattern lacks"],
    ),
    "bad_srs.json": (
        broken(lambda s: conform(s).update(srs="EPSG:2241x")),
        ["layers.addresses[0].conform.srs: 'EPSG:2241x' is not of the form EPSG:<code>"],
    ),
    "csv_without_lon_lat.json": (
        broken(lambda s: [conform(s).update(format="csv"), conform(s).pop("lon", None),
                          conform(s).pop("lat", None)]),
        ["layers.addresses[0].conform: the data has no geometry and the conform names no lon "
         "and lat fields"],
    ),
    "failing_test.json": (
        broken(lambda s: entry(s)["test"]["acceptance-tests"][2]["expected"].update(
            number="9999")),
        ["layers.addresses[0].test.acceptance-tests[2]: acceptance test 'address with BLDG "
         "alpha-numeric unit' failed: number: expected \"9999\", got \"900\""],
    ),
    "two_broken_entries.json": (
        broken(lambda s: [
            conform(s, 0).update(number={"function": "nope", "field": "ANUMBER"}),
            entry(s, 1).update(protocol="gopher"),
        ], GOOD[1]),
        ["layers.addresses[0].conform.number: unknown function 'nope'; known here: chain, "
         "constant, first_non_empty, format, get, join, map, mph_to_kph, prefixed_number, "
         "regexp, remove_postfix, remove_prefix",
         "layers.addresses[1].protocol: 'gopher' is not one of ['http', 'ftp', 'ESRI']"],
    ),
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A checkout-like folder: sources/ with good and bad files, and JSON outside it."""
    root = tmp_path / "checkout"
    for name in GOOD:
        target = root / "sources" / name.split("/", 1)[1]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(FIXTURES / name, target)
    for name, (text, _) in BAD.items():
        (root / "sources" / "zz" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "sources" / "zz" / name).write_text(text)
    (root / "package.json").write_text('{"not": "a source"}')
    return root


def test_a_folder_of_good_and_bad_files(folder: Path) -> None:
    result = check_sources_cli(folder, "--jobs", "1")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    expected = [
        f"{folder}/sources/zz/{name}: {line}"
        for name in sorted(BAD) for line in BAD[name][1]
    ]
    assert lines[:-1] == expected
    # 6 good files with 14 entries and 4 + 11 tests; 8 bad ones with 8 entries, where the
    # tests of an entry whose conform is broken are not run (those of failing_test.json are).
    assert lines[-1] == (
        "14 files, 22 entries, 19 acceptance tests: 9 problems in 8 files, "
        "1 acceptance test failed"
    )
    assert result.stderr == ""


def test_good_files_pass_with_exit_0(folder: Path) -> None:
    good = [folder / "sources" / name.split("/", 1)[1] for name in GOOD]
    result = check_sources_cli(*good)
    assert result.returncode == 0, result.stdout
    assert result.stdout == "6 files, 14 entries, 15 acceptance tests: all passed\n"


def test_json_for_machines(folder: Path) -> None:
    result = check_sources_cli("--json", folder / "sources" / "zz" / "failing_test.json",
                               folder / "sources" / "us" / "pa")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert {k: v for k, v in report.items() if k != "problems"} == {
        "ok": False, "files": 2, "entries": 3, "acceptance_tests": 15,
        "acceptance_tests_failed": 1,
        "summary": "2 files, 3 entries, 15 acceptance tests: 1 problem in 1 file, "
                   "1 acceptance test failed",
    }
    (problem,) = report["problems"]
    assert problem["file"].endswith("zz/failing_test.json")
    assert problem["where"] == "layers.addresses[0].test.acceptance-tests[2]"
    assert problem["code"] == "test_failed"
    assert problem["message"].startswith("acceptance test 'address with BLDG alpha-numeric")


def test_a_path_that_is_not_there(tmp_path: Path) -> None:
    result = check_sources_cli(tmp_path / "nope.json")
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{tmp_path}/nope.json: no such file or folder",
        "0 files, 0 entries, 0 acceptance tests: 1 problem in 1 file",
    ]


def test_an_empty_folder_passes(tmp_path: Path) -> None:
    result = check_sources_cli(tmp_path)
    assert (result.returncode, result.stdout) == (
        0, "0 files, 0 entries, 0 acceptance tests: all passed\n")


def test_help_names_every_option() -> None:
    result = check_sources_cli("--help")
    assert result.returncode == 0
    for option in ("PATH", "--json", "--jobs"):
        assert option in result.stdout
    assert "exits 1 on any problem" in result.stdout


def test_check_text_gives_structured_problems() -> None:
    text, _ = BAD["bad_pattern.json"]
    report = check_text(text.encode(), "sources/us/tx/x.json")
    assert report.problems == [Problem(
        "sources/us/tx/x.json", "layers.addresses[0].conform.number",
        "pattern '^([0-9]+' does not compile: missing ), unterminated subpattern at position 1",
        "conform_failed",
    )]
    # The entry's acceptance tests are not run on a conform that does not compile.
    assert (report.entries, report.tests, report.tests_failed) == (1, 0, 0)
    unknown = check_text(BAD["unknown_format.json"][0], "x.json").problems
    assert [p.code for p in unknown] == ["unknown_format"]
    assert check_text(b"\xff", "x.json").problems[0].message.startswith("not UTF-8 text")


def test_a_v1_source_is_checked_upgraded() -> None:
    v1 = {"coverage": {"country": "us"}, "type": "http", "data": "https://x.invalid/a.csv",
          "conform": {"type": "csv", "lon": "X", "lat": "Y", "number": "N",
                      "street": {"function": "regexp", "field": "S", "pattern": "("}}}
    (problem,) = check_text(json.dumps(v1), "v1.json").problems
    assert problem.where == "layers.addresses[0].conform.street"


def test_parallel_and_serial_agree(folder: Path) -> None:
    serial = check_sources([folder], jobs=1)
    parallel = check_sources([folder], jobs=2)
    assert serial.to_json() == parallel.to_json()


@pytest.mark.slow
@pytest.mark.skipif(not MIRROR.is_dir(), reason="the real sources repository is not mirrored")
def test_the_whole_real_sources_repository_passes_within_30_s(tmp_path: Path) -> None:
    archive = subprocess.run(
        ["git", f"--git-dir={MIRROR}", "archive", "--format=tar", "HEAD", "sources"],
        capture_output=True, check=True, timeout=120,
    ).stdout
    tar_path = tmp_path / "sources.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(tmp_path / "repo", filter="data")
    started = time.monotonic()
    result = check_sources_cli(tmp_path / "repo")
    elapsed_s = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:]
    assert result.stdout.endswith(": all passed\n")
    count = len(list((tmp_path / "repo" / "sources").rglob("*.json")))
    assert result.stdout.startswith(f"{count} files, ")
    assert elapsed_s < 30, f"check-sources took {elapsed_s:.1f} s over {count} files"


def test_report_summary_counts() -> None:
    report = CheckReport(files=1, entries=1, tests=1)
    assert report.summary() == "1 file, 1 entry, 1 acceptance test: all passed"

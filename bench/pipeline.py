"""End-to-end benchmark: ``oa-machine process-one`` against the raw read speed of the same file.

Usage::

    .venv/bin/python -m bench.pipeline [--repeat N] [--csv-rows 100000,1000000]
                                       [--shp-rows 100000,200000] [--markdown FILE]

Inputs are generated deterministically under ``bench/data/`` (gitignored) and reused:

* ``addresses_{n}.csv``: a county-style address CSV. ``ADDRESS`` holds a full line such as
  ``1234 N MAIN ST APT 5`` (house numbers with letters and fractions, directionals, suffixes,
  units on ~20 % of rows), ``ZIP`` is ZIP or ZIP+4, ``BLOCK``/``LOT`` are joined into the id,
  ``LON``/``LAT`` are WGS 84. The source uses a ``regexp`` (unit out of the address and the
  5-digit ZIP), a ``join`` (id) and a ``prefixed_number``/``postfixed_street`` pair.
* ``points_{n}.zip``: a zipped point shapefile in EPSG:2227 (California zone 3, US feet) with
  typed fields (integer house number, text street, integer ZIP); the source names
  ``srs: EPSG:2227`` so every point is reprojected.

Measured, each in a fresh process so peak RSS is its own:

* raw read ceilings: the ``csv`` module (every row as a list of str) and ``pyarrow.csv``
  (``read_csv``, every column as text) for the CSV; ``pyogrio.read_arrow`` of the unzipped
  ``.shp`` for the shapefile;
* ``process-one``: the real CLI (``.venv/bin/oa-machine process-one``) in a subprocess, timed
  wall-clock from launch to exit (start-up, copy and md5 of the download, unzip, read,
  conform, writing out.geojson / out.csv / processed.zip / preview.png, index.json).
  Peak RSS is the largest ``ru_maxrss`` among the processes of the command (the CLI and its
  isolated child; ``RUSAGE_CHILDREN`` of a tiny wrapper process), and the worker child's own
  ``VmHWM`` is polled from ``/proc`` as a cross-check.

Timings on a shared machine are noisy: every case runs ``--repeat`` times and the table gives
the best and the median.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data"
VENV_BIN = Path(sys.executable).parent
CLI = str(VENV_BIN / "oa-machine")

# --- realistic values -----------------------------------------------------------------------

_STREET_NAMES = [
    "MAIN", "OAK", "PINE", "MAPLE", "CEDAR", "ELM", "WASHINGTON", "LAKE", "HILL", "PARK",
    "1ST", "2ND", "3RD", "4TH", "5TH", "MISSION", "VALENCIA", "EL CAMINO REAL", "SAN PABLO",
    "MARTIN LUTHER KING JR", "BROADWAY", "SUNSET", "LINCOLN", "JEFFERSON", "FRANKLIN",
    "LOS GATOS", "DE ANZA", "STEVENS CREEK", "ALMADEN", "BLOSSOM HILL", "SANTA CRUZ",
]
_SUFFIXES = ["ST", "AVE", "BLVD", "DR", "RD", "LN", "CT", "WAY", "PL", "TER", "CIR", "HWY"]
_DIRECTIONS = ["", "", "", "", "N ", "S ", "E ", "W "]
_UNITS = ["APT", "UNIT", "STE", "#"]
_CITIES = [
    "SAN FRANCISCO", "OAKLAND", "SAN JOSE", "BERKELEY", "FREMONT", "HAYWARD", "SUNNYVALE",
    "SANTA CLARA", "PALO ALTO", "MOUNTAIN VIEW", "DALY CITY", "SAN MATEO", "WALNUT CREEK",
    "RICHMOND", "CONCORD", "LIVERMORE", "PLEASANTON", "MILPITAS", "CUPERTINO", "LOS GATOS",
]
#: lon/lat box of the Bay Area, inside EPSG:2227's area of use.
_LON = (-122.6, -121.6)
_LAT = (37.2, 38.1)

CSV_CONFORM = {
    "format": "csv",
    "number": {"function": "prefixed_number", "field": "ADDRESS"},
    "street": {"function": "postfixed_street", "field": "ADDRESS"},
    "unit": {
        "function": "regexp",
        "field": "ADDRESS",
        "pattern": r"(?:APT|UNIT|STE|#)\s*([0-9A-Z-]+)$",
    },
    "city": "CITY",
    "postcode": {"function": "regexp", "field": "ZIP", "pattern": r"^(\d{5})"},
    "region": "STATE",
    "id": {"function": "join", "fields": ["BLOCK", "LOT"], "separator": "-"},
    "lon": "LON",
    "lat": "LAT",
}

SHP_CONFORM = {
    "format": "shapefile",
    "srs": "EPSG:2227",
    "number": "ADDR_NUM",
    "street": {"function": "join", "fields": ["ST_PREFIX", "ST_NAME", "ST_TYPE"]},
    "unit": "UNIT",
    "city": "CITY",
    "postcode": "ZIP",
    "id": "APN",
}


def _source(url: str, conform: dict, compression: str | None = None) -> dict:
    entry: dict = {"name": "bench", "data": url, "protocol": "http", "conform": conform}
    if compression:
        entry["compression"] = compression
    return {
        "schema": 2,
        "coverage": {"country": "us", "state": "ca"},
        "layers": {"addresses": [entry]},
    }


def _address_columns(rows: int, seed: int):  # -> dict[str, numpy array]
    import numpy as np

    rng = np.random.default_rng(seed)

    def pick(options: list[str], weights: list[float] | None = None) -> np.ndarray:
        choice = rng.choice(len(options), size=rows, p=weights)
        return np.array(options, dtype=object)[choice]

    numbers = rng.integers(1, 20_000, rows).astype(str).astype(object)
    number_tail = pick(["", "", "", "", "", "", "", "", "A", " 1/2"])
    direction = pick(_DIRECTIONS)
    name = pick(_STREET_NAMES)
    suffix = pick(_SUFFIXES)
    has_unit = rng.random(rows) < 0.2
    unit_word = pick(_UNITS)
    unit_value = rng.integers(1, 400, rows).astype(str).astype(object)
    unit = np.where(has_unit, unit_word + np.where(unit_word == "#", "", " ") + unit_value, "")
    return {
        "number": numbers + number_tail,
        "direction": direction,
        "name": name,
        "suffix": suffix,
        "unit": unit,
        "city": pick(_CITIES),
        "zip": rng.integers(94000, 95200, rows).astype(str).astype(object),
        "zip4": np.where(
            rng.random(rows) < 0.3, "-" + rng.integers(1000, 9999, rows).astype(str), ""
        ),
        "block": rng.integers(1, 9999, rows).astype(str).astype(object),
        "lot": rng.integers(1, 999, rows).astype(str).astype(object),
        "lon": rng.uniform(*_LON, rows),
        "lat": rng.uniform(*_LAT, rows),
    }


def make_csv(rows: int) -> Path:
    path = DATA / f"addresses_{rows}.csv"
    if path.exists():
        return path
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    DATA.mkdir(parents=True, exist_ok=True)
    c = _address_columns(rows, seed=rows)
    street = c["direction"] + c["name"] + " " + c["suffix"]
    address = c["number"] + " " + street + np.where(c["unit"] == "", "", " ") + c["unit"]
    table = pa.table({
        "OBJECTID": pa.array(np.arange(1, rows + 1)),
        "ADDRESS": pa.array(address, pa.string()),
        "CITY": pa.array(c["city"], pa.string()),
        "STATE": pa.array(np.full(rows, "CA", dtype=object), pa.string()),
        "ZIP": pa.array(c["zip"] + c["zip4"], pa.string()),
        "BLOCK": pa.array(c["block"], pa.string()),
        "LOT": pa.array(c["lot"], pa.string()),
        "LON": pa.array(np.round(c["lon"], 7)),
        "LAT": pa.array(np.round(c["lat"], 7)),
    })
    partial = path.with_suffix(".partial")
    pacsv.write_csv(table, partial)
    partial.rename(path)
    return path


def make_shapefile(rows: int) -> Path:
    """``points_{rows}.zip`` (and the unzipped files beside it, for the raw read)."""
    path = DATA / f"points_{rows}.zip"
    if path.exists():
        return path
    import numpy as np
    import pyarrow as pa
    import pyproj
    import shapely
    from pyogrio.raw import write_arrow

    DATA.mkdir(parents=True, exist_ok=True)
    c = _address_columns(rows, seed=rows + 1)
    to_feet = pyproj.Transformer.from_crs(4326, 2227, always_xy=True)
    x, y = to_feet.transform(c["lon"], c["lat"])
    numbers = np.array([int(n.split(" ")[0].rstrip("A")) for n in c["number"]], dtype=np.int32)
    table = pa.table({
        "APN": pa.array(c["block"] + "-" + c["lot"] + "-" + np.arange(rows).astype(str),
                        pa.string()),
        "ADDR_NUM": pa.array(numbers),
        "ST_PREFIX": pa.array([d.strip() for d in c["direction"]], pa.string()),
        "ST_NAME": pa.array(c["name"], pa.string()),
        "ST_TYPE": pa.array(c["suffix"], pa.string()),
        "UNIT": pa.array(c["unit"], pa.string()),
        "CITY": pa.array(c["city"], pa.string()),
        "ZIP": pa.array(c["zip"].astype(np.int32)),
        "geometry": pa.array(shapely.to_wkb(shapely.points(x, y)), pa.binary()),
    })
    folder = DATA / f"points_{rows}"
    folder.mkdir(exist_ok=True)
    shp = folder / "points.shp"
    # No .prj on purpose is rarer than a wrong one; write the right one, srs says the same.
    write_arrow(table, str(shp), geometry_name="geometry", geometry_type="Point",
                crs="EPSG:2227", driver="ESRI Shapefile",
                # Fields as wide as their values, as real shapefiles are (not 254 characters).
                layer_options={"RESIZE": "YES"})
    partial = path.with_suffix(".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for member in sorted(folder.iterdir()):
            archive.write(member, member.name)
    partial.rename(path)
    return path


def _shp_of(zip_path: Path) -> Path:
    return zip_path.with_suffix("") / "points.shp"


# --- raw read ceilings (run in a fresh child each) --------------------------------------------


def read_csv_module(path: Path) -> int:
    rows = 0
    with path.open(newline="", encoding="utf-8") as file:
        for _ in csv.reader(file):
            rows += 1
    return rows - 1


def read_pyarrow_csv(path: Path) -> int:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    with open(path, encoding="utf-8") as file:
        names = next(csv.reader(file))
    table = pacsv.read_csv(
        path, convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()))
    )
    return table.num_rows


def read_pyogrio_arrow(path: Path) -> int:
    from pyogrio.raw import read_arrow

    _, table = read_arrow(str(_shp_of(path)))
    return int(table.num_rows)


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _measure_read(task: Callable[[Path], int], path: Path, out: multiprocessing.Queue) -> None:
    # Imports are not reading: load them before the clock starts.
    import pyarrow.csv  # noqa: F401
    import pyogrio.raw  # noqa: F401

    start = time.perf_counter()
    rows = task(path)
    out.put((rows, time.perf_counter() - start, _peak_rss_mib()))


def measure_read(task: Callable[[Path], int], path: Path) -> tuple[int, float, float]:
    context = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = context.Queue()
    child = context.Process(target=_measure_read, args=(task, path, out))
    child.start()
    result = out.get()
    child.join()
    return result


# --- process-one ------------------------------------------------------------------------------

#: Run by a tiny ``python -c`` so that RUSAGE_CHILDREN is only the command's own processes
#: (a fork inherits its parent's peak RSS, so the wrapper must stay small).
_WRAPPER = r"""
import json, os, resource, subprocess, sys, time
cmd = sys.argv[1:]
start = time.perf_counter()
proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
hwm = 0
def descendants(pid):
    try:
        kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
    except OSError:
        return []
    return [k for kid in kids for k in [kid, *descendants(kid)]]
def poll():
    # The CLI, its zygote and the run's child (a grandchild): the largest is the run.
    global hwm
    for kid in descendants(proc.pid):
        try:
            for line in open(f"/proc/{kid}/status"):
                if line.startswith("VmHWM:"):
                    hwm = max(hwm, int(line.split()[1]))
        except OSError:
            pass
while proc.poll() is None:
    poll()
    time.sleep(0.02)
seconds = time.perf_counter() - start
err = proc.stderr.read().decode("utf-8", "replace")
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"code": proc.returncode, "seconds": seconds, "maxrss_kib": usage.ru_maxrss,
                  "child_hwm_kib": hwm, "cpu": usage.ru_utime + usage.ru_stime,
                  "stderr": err[-2000:]}))
"""


@dataclass
class Run:
    seconds: float
    peak_mib: float
    child_hwm_mib: float
    cpu_s: float
    features: int
    child_s: float


def process_one(source: dict, workdir: Path) -> Run:
    source_path = workdir / "bench.json"
    source_path.write_text(json.dumps(source))
    outdir = workdir / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OA_")}
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    result = subprocess.run(
        [sys.executable, "-S", "-c", _WRAPPER, CLI, "process-one", str(source_path), str(outdir)],
        capture_output=True, text=True, check=True, env=env, cwd=ROOT,
    )
    report = json.loads(result.stdout)
    index = json.loads((outdir / "index.json").read_text())
    if report["code"] != 0 or not index.get("feature count"):
        log_path = outdir / "output.txt"
        log = log_path.read_text()[-3000:] if log_path.exists() else ""
        raise RuntimeError(f"process-one failed: {report['stderr']}\n{log}")
    return Run(
        seconds=report["seconds"],
        peak_mib=report["maxrss_kib"] / 1024,
        child_hwm_mib=report["child_hwm_kib"] / 1024,
        cpu_s=report["cpu"],
        features=int(index["feature count"]),
        child_s=float(index.get("process time") or 0.0),
    )


# --- the table --------------------------------------------------------------------------------


@dataclass
class Row:
    case: str
    rows: int
    best_s: float
    median_s: float
    peak_mib: float
    note: str = ""

    @property
    def best_rate(self) -> float:
        return self.rows / self.best_s

    @property
    def median_rate(self) -> float:
        return self.rows / self.median_s


def _read_rows(name: str, task: Callable[[Path], int], path: Path, rows: int,
               repeat: int) -> Row:
    results = [measure_read(task, path) for _ in range(repeat)]
    for read, _, _ in results:
        assert read == rows, (name, read, rows)
    times = [s for _, s, _ in results]
    return Row(name, rows, min(times), statistics.median(times), max(p for *_, p in results))


def _pipeline_row(name: str, source: dict, rows: int, repeat: int) -> Row:
    runs: list[Run] = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="oa-bench-") as folder:
            runs.append(process_one(source, Path(folder)))
    for run in runs:
        assert run.features == rows, (name, run.features, rows)
    times = [r.seconds for r in runs]
    note = (f"child VmHWM {max(r.child_hwm_mib for r in runs):.0f} MiB, "
            f"run_entry {min(r.child_s for r in runs):.2f} s, "
            f"CPU {min(r.cpu_s for r in runs):.1f} s")
    return Row(name, rows, min(times), statistics.median(times), max(r.peak_mib for r in runs),
               note)


def run_all(csv_rows: list[int], shp_rows: list[int], repeat: int) -> list[Row]:
    table: list[Row] = []
    for rows in csv_rows:
        path = make_csv(rows)
        for name, task in (("csv module (raw read)", read_csv_module),
                           ("pyarrow.csv (raw read)", read_pyarrow_csv)):
            table.append(_read_rows(name, task, path, rows, repeat))
            _print_row(table[-1])
        source = _source(path.as_uri(), CSV_CONFORM)
        table.append(_pipeline_row("process-one CSV", source, rows, repeat))
        _print_row(table[-1])
    for rows in shp_rows:
        path = make_shapefile(rows)
        table.append(_read_rows("pyogrio.read_arrow (raw read)", read_pyogrio_arrow, path, rows,
                                repeat))
        _print_row(table[-1])
        source = _source(path.as_uri(), SHP_CONFORM, compression="zip")
        table.append(_pipeline_row("process-one shapefile EPSG:2227", source, rows, repeat))
        _print_row(table[-1])
    return table


_HEADER = (f"{'case':<34} {'rows':>9} {'best s':>7} {'median s':>8} {'best rows/s':>12} "
           f"{'median rows/s':>13} {'peak RSS MiB':>12}")


def _print_row(row: Row) -> None:
    print(f"{row.case:<34} {row.rows:>9,} {row.best_s:>7.2f} {row.median_s:>8.2f} "
          f"{row.best_rate:>12,.0f} {row.median_rate:>13,.0f} {row.peak_mib:>12.0f}"
          + (f"  ({row.note})" if row.note else ""), flush=True)


def markdown(table: list[Row]) -> str:
    lines = [
        "| case | rows | best s | median s | best rows/s | median rows/s | peak RSS MiB | notes |",
        "|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in table:
        lines.append(
            f"| {r.case} | {r.rows:,} | {r.best_s:.2f} | {r.median_s:.2f} | {r.best_rate:,.0f} "
            f"| {r.median_rate:,.0f} | {r.peak_mib:.0f} | {r.note} |"
        )
    return "\n".join(lines) + "\n"


def _counts(text: str) -> list[int]:
    return [int(part.replace("_", "")) for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--csv-rows", type=_counts, default=[100_000, 1_000_000])
    parser.add_argument("--shp-rows", type=_counts, default=[100_000, 200_000])
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown here")
    args = parser.parse_args(argv)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, repeat {args.repeat}")
    print(_HEADER, flush=True)
    table = run_all(args.csv_rows, args.shp_rows, args.repeat)
    if args.markdown:
        args.markdown.write_text(markdown(table))


if __name__ == "__main__":
    main()

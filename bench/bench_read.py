"""Benchmark: raw read speed and peak memory of the readers.

Usage: ``.venv/bin/python bench/bench_read.py [rows ...]`` (default: 100000 1000000)

For each row count it writes a synthetic address CSV (8 columns, one quoted field with a
comma) and a point shapefile with the same attributes, then reads each file to the end:

* CSV with the standard library's ``csv`` module (every row as a list of str), and with
  ``open_reader`` (Arrow batches of strings);
* the shapefile with ``pyogrio.read_arrow`` (whole layer as one table, typed columns) and with
  ``open_reader`` (batches, every field turned to text).

Every measurement runs in a fresh child process so its peak RSS (``VmHWM``) is its own.
A flat peak RSS from 100k to 1M rows for ``open_reader`` is the point of the exercise.
"""

from __future__ import annotations

import csv
import multiprocessing
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv
import shapely
from pyogrio.raw import read_arrow, write_arrow

from services.worker.conform.readers import open_reader

_STREETS = ["MAIN ST", "OAK AVE", "ELM, WEST", "RUE DE L'ÉGLISE", "1ST ST", "HAUPTSTRASSE"]


def _columns(rows: int) -> dict[str, pa.Array]:
    rng = np.random.default_rng(7)
    lon = rng.uniform(-124.0, -117.0, rows)
    lat = rng.uniform(32.0, 42.0, rows)
    return {
        "ID": pa.array(np.arange(rows), pa.int64()),
        "NUMBER": pa.array(rng.integers(1, 20_000, rows), pa.int32()),
        "STREET": pa.array(np.array(_STREETS, dtype=object)[rng.integers(0, 6, rows)]),
        "UNIT": pa.array(np.where(rng.random(rows) < 0.2, "APT 2", "")),
        "CITY": pa.array(np.full(rows, "SAN FRANCISCO", dtype=object)),
        "POSTCODE": pa.array(rng.integers(90_000, 96_000, rows).astype(str)),
        "LON": pa.array(lon),
        "LAT": pa.array(lat),
    }


def _write_files(rows: int, folder: Path) -> tuple[Path, Path]:
    columns = _columns(rows)
    csv_path = folder / f"addresses_{rows}.csv"
    pa.csv.write_csv(pa.table(columns), csv_path)
    shp_path = folder / f"addresses_{rows}.shp"
    points = shapely.points(columns["LON"].to_numpy(), columns["LAT"].to_numpy())
    table = pa.table({**columns, "geometry": pa.array(shapely.to_wkb(points), pa.binary())})
    write_arrow(
        table, str(shp_path), geometry_name="geometry", geometry_type="Point", crs="EPSG:4326"
    )
    return csv_path, shp_path


def read_csv_module(path: Path) -> int:
    rows = 0
    with path.open(newline="", encoding="utf-8") as file:
        for _ in csv.reader(file):
            rows += 1
    return rows - 1


def read_with_reader(path: Path, fmt: str) -> int:
    rows = 0
    with open_reader(path, {"format": fmt}) as reader:
        for batch in reader.batches():
            rows += batch.num_rows
    return rows


def read_csv_reader(path: Path) -> int:
    return read_with_reader(path, "csv")


def read_shp_reader(path: Path) -> int:
    return read_with_reader(path, "shapefile")


def read_shp_pyogrio(path: Path) -> int:
    _, table = read_arrow(str(path))
    return int(table.num_rows)


def _measure(task: Callable[[Path], int], path: Path, out: multiprocessing.Queue) -> None:
    start = time.perf_counter()
    rows = task(path)
    seconds = time.perf_counter() - start
    out.put((rows, seconds, _peak_rss_mib()))


def _peak_rss_mib() -> float:
    # VmHWM belongs to this process's address space; ru_maxrss would include the parent's
    # peak, which Linux carries across fork and exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(task: Callable[[Path], int], path: Path) -> tuple[int, float, float]:
    context = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = context.Queue()
    child = context.Process(target=_measure, args=(task, path, out))
    child.start()
    result = out.get()
    child.join()
    return result


def main(row_counts: list[int]) -> None:
    cases: list[tuple[str, Callable[[Path], int], int]] = [
        ("csv module", read_csv_module, 0),
        ("open_reader csv", read_csv_reader, 0),
        ("pyogrio.read_arrow shp", read_shp_pyogrio, 1),
        ("open_reader shp", read_shp_reader, 1),
    ]
    print(f"{'reader':<24} {'rows':>9} {'seconds':>8} {'rows/s':>11} {'peak RSS MiB':>13}")
    with tempfile.TemporaryDirectory() as folder:
        for rows in row_counts:
            paths = _write_files(rows, Path(folder))
            for name, task, which in cases:
                read, seconds, peak_mib = measure(task, paths[which])
                assert read == rows, (name, read, rows)
                print(
                    f"{name:<24} {read:>9} {seconds:>8.2f} {read / seconds:>11,.0f} "
                    f"{peak_mib:>13.0f}"
                )


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]] or [100_000, 1_000_000])

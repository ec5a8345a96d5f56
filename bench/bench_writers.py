"""Benchmark: OutputWriter on 1M synthetic address rows (and hash_rows on the same data).

Usage: ``.venv/bin/python bench/bench_writers.py [rows] [batch_rows]``

Prints rows/s for hashing and for writing (out.geojson + out.csv + processed.zip + preview.png),
and the process's peak RSS, which should not grow with the row count.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from services.worker.conform.hashing import hash_rows
from services.worker.conform.layers import LAYER_ATTRIBUTES
from services.worker.conform.writers import OutputWriter

_STREETS = np.array(["MAIN ST", "OAK AVE", 'N "B" ST', "ELM, WEST", "RUE DE L'ÉGLISE", "1ST ST"])
_CITIES = np.array(["EUGENE", "SPRINGFIELD", None, "COTTAGE GROVE"], dtype=object)


def _batch(start: int, rows: int, rng: np.random.Generator) -> pa.RecordBatch:
    """A conformed-looking batch: realistic value shapes, some nulls, some quoting needed."""
    ids = np.arange(start, start + rows)
    attributes: dict[str, pa.Array] = {
        "number": pa.array((ids % 9973 + 1).astype(str)),
        "street": pa.array(_STREETS[ids % len(_STREETS)]),
        "unit": pa.array(["APT 2" if i % 7 == 0 else None for i in ids.tolist()], pa.string()),
        "city": pa.array(_CITIES[ids % len(_CITIES)], type=pa.string()),
        "district": pa.nulls(rows, type=pa.string()),
        "region": pa.array(np.full(rows, "OR")),
        "postcode": pa.array((97400 + ids % 90).astype(str)),
        "id": pa.array(np.char.add("ID-", ids.astype(str))),
        "accuracy": pa.nulls(rows, type=pa.string()),
    }
    lon = np.round(rng.uniform(-123.6, -122.2, rows), 7)
    lat = np.round(rng.uniform(43.4, 44.3, rows), 7)
    columns = {name: attributes[name] for name in LAYER_ATTRIBUTES["addresses"]}
    columns["hash"] = hash_rows(attributes, (lon, lat))
    return pa.RecordBatch.from_pydict({**columns, "lon": lon, "lat": lat})


def _batches(rows: int, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Cycles through a few pre-built batches, so that building them (hashing included) is
    not timed and does not compete with the writer's threads, and RSS shows only the writer."""
    rng = np.random.default_rng(7)
    prebuilt = [_batch(i * batch_rows, batch_rows, rng) for i in range(4)]
    for number, start in enumerate(range(0, rows, batch_rows)):
        yield prebuilt[number % len(prebuilt)].slice(0, min(batch_rows, rows - start))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    batch_rows = int(sys.argv[2]) if len(sys.argv) > 2 else 65_536

    # Hashing alone, on pre-built batches of attributes (the engine calls it, not the writer).
    sample = _batch(0, batch_rows, np.random.default_rng(1))
    attributes = {n: sample.column(n) for n in LAYER_ATTRIBUTES["addresses"]}
    geometry = (sample.column("lon").to_numpy(), sample.column("lat").to_numpy())
    started = time.perf_counter()
    repeats = max(1, rows // batch_rows)
    for _ in range(repeats):
        hash_rows(attributes, geometry)
    hash_s = time.perf_counter() - started
    print(f"hash_rows: {repeats * batch_rows / hash_s:,.0f} rows/s")

    with tempfile.TemporaryDirectory() as tmp:
        outdir = Path(tmp)
        batches = _batches(rows, batch_rows)
        first = next(batches)
        started = time.perf_counter()
        with OutputWriter(
            outdir, "addresses", source_name="us/or/lane", attribution={"license": "bench"}
        ) as writer:
            writer.write(first)
            for batch in batches:
                writer.write(batch)
            write_s = time.perf_counter() - started
            summary = writer.close()
        build_s = time.perf_counter() - started - write_s
        sizes = {name: path.stat().st_size / 2**20 for name, path in summary.files.items()}
    total_s = write_s + build_s
    print(f"rows: {summary.feature_count:,} in batches of {batch_rows:,}")
    print(f"write() calls: {write_s:.2f} s ({rows / write_s:,.0f} rows/s)")
    print(f"close() (drain sinks, finish zip, preview): {build_s:.2f} s")
    print(f"writer total: {total_s:.2f} s ({rows / total_s:,.0f} rows/s)")
    print("sizes MiB: " + ", ".join(f"{k} {v:.1f}" for k, v in sizes.items()))
    print(f"peak RSS: {_peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()

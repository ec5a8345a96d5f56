"""Micro-benchmark of the conform functions: rows per second over 1M synthetic rows.

Run: ``.venv/bin/python bench/bench_functions.py [rows]``. Prints one line per spec set, the
figure the pipeline target (330,000 rows/s end to end) is measured against being "pipeline":
a regexp, a join and a prefixed_number/postfixed_street pair, plus cleaning.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from services.worker.conform.cleaning import clean
from services.worker.conform.functions import Evaluator

BATCH_ROWS = 65_536

STREETS = ["Main St", "Rue de l'Église", "OAK AVE STE 4", "大同路", "Calle de Lago", "3rd St"]
CITIES = ["Seedorf UR", "Altdorf UR", "Flüelen", "Erstfeld  UR", "宜蘭"]


def make_batches(rows: int) -> list[pa.RecordBatch]:
    rng = random.Random(7)
    batches = []
    for start in range(0, rows, BATCH_ROWS):
        size = min(BATCH_ROWS, rows - start)
        numbers = [str(rng.randint(1, 99999)) for _ in range(size)]
        address = [f"{n}{rng.choice(['', 'A', '-1/2'])} {rng.choice(STREETS)}" for n in numbers]
        batches.append(
            pa.RecordBatch.from_pydict(
                {
                    "ADDRESS": pa.array(address, pa.string()),
                    "City": pa.array([rng.choice(CITIES) for _ in range(size)], pa.string()),
                    "REGION_CODE": pa.array(["BE-WAL"] * size, pa.string()),
                    "address_id": pa.array(numbers, pa.string()),
                    "unit": pa.array([rng.choice(["", "2", None]) for _ in range(size)]),
                }
            )
        )
    return batches


CASES: dict[str, Mapping[str, Any]] = {
    "prefixed_number": {"number": {"function": "prefixed_number", "field": "address"}},
    "postfixed_street": {"street": {"function": "postfixed_street", "field": "address"}},
    "regexp (extract)": {
        "city": {"function": "regexp", "field": "city", "pattern": r"^(.+?)\s+UR$"}
    },
    "regexp (replace)": {
        "city": {
            "function": "regexp",
            "field": "city",
            "pattern": r"^(.+?)(?:\s+UR)?\s*$",
            "replace": "$1",
        }
    },
    "join": {"id": {"function": "join", "fields": ["region_code", "address_id"], "separator": ":"}},
    "pipeline": {
        "number": {"function": "prefixed_number", "field": "address"},
        "street": {"function": "postfixed_street", "field": "address"},
        "city": {
            "function": "regexp",
            "field": "city",
            "pattern": r"^(.+?)(?:\s+UR)?\s*$",
            "replace": "$1",
        },
        "id": {"function": "join", "fields": ["region_code", "address_id"], "separator": ":"},
        "unit": "unit",
    },
    "regexp (lookbehind, Python fallback)": {
        "city": {
            "function": "regexp",
            "field": "city",
            "pattern": r"^(.+?)(?:(?<=Seedorf)UR|\s+UR)?\s*$",
        }
    },
}


def run(name: str, specs: Mapping[str, Any], batches: list[pa.RecordBatch]) -> None:
    evaluator = Evaluator(specs, batches[0].schema.names)
    rows = sum(b.num_rows for b in batches)
    started = time.perf_counter()
    for batch in batches:
        for attribute, values in evaluator.evaluate(batch).items():
            clean(attribute, values)
    elapsed = time.perf_counter() - started
    print(f"{name:40s} {rows / elapsed:>14,.0f} rows/s  {elapsed / rows * 1e9:8.0f} ns/row")


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    batches = make_batches(rows)
    for name, specs in CASES.items():
        run(name, specs, batches)


if __name__ == "__main__":
    main()

"""Benchmark: the fixed cost of one isolated run, forked from the zygote or started afresh.

Usage: ``.venv/bin/python -m bench.bench_isolation [runs]``

Each run processes a two-row local CSV, so what is measured is the cost of getting a run's
process going and back, not of conforming. Two ways, each ``runs`` times after one warm-up:

* ``zygote``: ``run_isolated`` as the worker service calls it (a fork of the pre-imported
  zygote, which is started and warmed once, outside the clock);
* ``fresh interpreter``: ``python -m services.worker.child REQUEST.json`` in a new process, the
  way every run was started before the zygote (session 1), with the same request.

Prints the median and best wall time per run of each.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from services.worker.isolation import Limits, RunRequest, run_isolated

_CSV = "LON,LAT,NUM,STREET\n-100.1,38.1,12,Main St\n-100.2,38.2,14,Oak Ave\n"


def _request(root: Path, name: str) -> RunRequest:
    data = root / "data.csv"
    if not data.exists():
        data.write_text(_CSV)
    source = {
        "coverage": {"country": "us", "state": "ks"},
        "schema": 2,
        "layers": {"addresses": [{
            "name": "county", "data": data.as_uri(), "protocol": "http",
            "conform": {"format": "csv", "lon": "LON", "lat": "LAT", "number": "NUM",
                        "street": "STREET"},
        }]},
    }
    return RunRequest(source=source, source_path="us/ks/county", layer="addresses",
                      entry_name="county", outdir=str(root / name / "out"),
                      workdir=str(root / name / "work"), allow_files=True)


def _zygote_runs(root: Path, runs: int) -> list[float]:
    async def go() -> list[float]:
        await run_isolated(_request(root, "warm"), Limits(60, 4 * 1024**3))
        times = []
        for i in range(runs):
            started = time.perf_counter()
            state = await run_isolated(_request(root, f"z{i}"), Limits(60, 4 * 1024**3))
            times.append(time.perf_counter() - started)
            assert state.feature_count == 2, state.error
        return times

    return asyncio.run(go())


def _fresh_runs(root: Path, runs: int) -> list[float]:
    times = []
    for i in range(-1, runs):
        request = _request(root, f"f{i}")
        Path(request.workdir).mkdir(parents=True)
        Path(request.outdir).mkdir(parents=True)
        path = Path(request.workdir) / "request.json"
        path.write_text(json.dumps(asdict(request)))
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "services.worker.child", str(path)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if i >= 0:
            times.append(time.perf_counter() - started)
        index = json.loads((Path(request.outdir) / "index.json").read_text())
        assert index["feature count"] == 2, index
    return times


def main(argv: list[str]) -> None:
    runs = int(argv[0]) if argv else 10
    with tempfile.TemporaryDirectory(prefix="oa-bench-isolation-") as tmp:
        root = Path(tmp)
        for label, measure in (("zygote", _zygote_runs), ("fresh interpreter", _fresh_runs)):
            times = measure(root, runs)
            print(f"{label:18s} {runs} runs: median {statistics.median(times) * 1000:7.1f} ms, "
                  f"best {min(times) * 1000:7.1f} ms per run")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Esri layer downloads: ours against esridump, on the same fake ArcGIS server, in one run.

    .venv/bin/python -m bench.bench_esri [--features 300000] [--latency-s 0.15]
        [--max-record-count 2000] [--limits 1,4] [--repeat 1]

The layer is served by the tests' fake ArcGIS server (``tests/support/arcgis.py``) in its
own process, so that building its answers does not take the clients' core: address points
with five attributes, ``--latency-s`` added to every request, ``maxRecordCount`` as given,
pagination supported. Each contender runs in a fresh process of its own and reports its wall
time (from the first request to the last line on disk), the features it wrote and its peak
RSS:

* **esridump** (``EsriDumper``, what the reference uses) with its pause turned off
  (``pause_seconds=0``: the command line sleeps 10 s after every 5 requests), writing one
  ``json.dumps`` line per feature as its ``--jsonlines`` option does;
* **ours** (``services.worker.sources.esri.dump``) at each ``--limits`` value (requests in
  flight to the host), with its own slot folder.

The server reports the most requests it had in flight at once during each contender's run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.support.arcgis import FakeArcGIS, FakeLayer, point_feature

LAYER = "bench"


# --- the server (its own process) ------------------------------------------------------------


class BenchArcGIS(FakeArcGIS):
    """The fake server, plus ``/_watch`` to read and reset its in-flight peak."""

    def build_app(self) -> web.Application:
        app = super().build_app()
        app.router.add_get("/_watch", self._read_watch)
        return app

    async def _read_watch(self, request: web.Request) -> web.Response:
        peak = self.peak_in_flight
        self.reset_watch()
        self.requests.clear()
        return web.json_response({"peak_in_flight": peak})


def _features(count: int) -> list[dict[str, Any]]:
    streets = ["MAIN ST", "OAK AVE", "PINE RD", "MAPLE DR", "CEDAR LN", "ELM CT", "1ST ST"]
    return [
        point_feature(
            oid,
            -122.5 + (oid % 1000) / 1000,
            37.5 + (oid // 1000) / 1000,
            ADDRESS=str(100 + oid % 9000),
            STREET=streets[oid % len(streets)],
            UNIT="" if oid % 5 else f"APT {oid % 40}",
            CITY="SPRINGFIELD",
            ZIP=str(94000 + oid % 700),
        )
        for oid in range(1, count + 1)
    ]


async def _serve(features: int, latency_s: float, max_record_count: int) -> None:
    server = BenchArcGIS()
    layer = FakeLayer(_features(features), max_record_count=max_record_count, latency_s=latency_s)
    await server.start()
    url = server.add_layer(LAYER, layer)
    print(url, flush=True)
    # Until the benchmark closes our stdin.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.close()


# --- the contenders (each its own process) ------------------------------------------------------


def _report(started: float, count: int) -> None:
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": time.perf_counter() - started, "features": count,
                      "peak_rss_mib": peak_kib / 1024}))


def _run_esridump(url: str, out: Path) -> None:
    from esridump.dumper import EsriDumper

    started = time.perf_counter()
    count = 0
    with out.open("w") as handle:
        for feature in EsriDumper(url, pause_seconds=0):
            handle.write(json.dumps(feature))
            handle.write("\n")
            count += 1
    _report(started, count)


def _run_ours(url: str, out: Path, limit: int) -> None:
    from services.worker.sources import esri
    from services.worker.sources.guard import UrlPolicy

    started = time.perf_counter()
    got = esri.dump(
        url, out, policy=UrlPolicy(allow_private=True),
        host_limit=esri.HostLimit(limit, out.parent / f"slots-{limit}"),
    )
    _report(started, got.written_count)


# --- the benchmark ------------------------------------------------------------------------------


def _contender(args: list[str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.bench_esri", *args], capture_output=True, text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{args[0]} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _peak_in_flight(url: str) -> int:
    import urllib.request

    base = url.split("/arcgis/")[0]
    with urllib.request.urlopen(base + "/_watch") as answer:
        return int(json.load(answer)["peak_in_flight"])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_esri")
    parser.add_argument("--features", type=int, default=300_000)
    parser.add_argument("--latency-s", type=float, default=0.15)
    parser.add_argument("--max-record-count", type=int, default=2000)
    parser.add_argument("--limits", default="1,4", help="our requests in flight, comma-separated")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)
    limits = [int(value) for value in args.limits.split(",")]

    server = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_esri", "serve", str(args.features),
         str(args.latency_s), str(args.max_record_count)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        print(f"{args.features:,} point features, {args.latency_s * 1000:g} ms per request, "
              f"maxRecordCount {args.max_record_count:,}; server {url}")
        _peak_in_flight(url)
        with tempfile.TemporaryDirectory(prefix="bench-esri-") as scratch:
            results: dict[str, list[dict[str, Any]]] = {}
            for _ in range(args.repeat):
                runs = [("esridump", ["esridump", url, f"{scratch}/esridump.jsonl"])]
                runs += [(f"ours, limit {limit}",
                          ["ours", url, f"{scratch}/ours-{limit}.geojsonl", str(limit)])
                         for limit in limits]
                for name, command in runs:
                    got = _contender(command)
                    got["peak_in_flight"] = _peak_in_flight(url)
                    results.setdefault(name, []).append(got)
                    print(f"  {name:16} {got['seconds']:7.2f} s  {got['features']:>9,} features"
                          f"  peak RSS {got['peak_rss_mib']:6.1f} MiB"
                          f"  in flight ≤ {got['peak_in_flight']}", flush=True)
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(timeout=30)

    best = {name: min(runs, key=lambda r: r["seconds"]) for name, runs in results.items()}
    baseline = best["esridump"]
    print("\nbest of", args.repeat)
    for name, got in best.items():
        same = "same features" if got["features"] == baseline["features"] else "DIFFERENT COUNT"
        print(f"  {name:16} {got['seconds']:7.2f} s  ×{baseline['seconds'] / got['seconds']:5.2f}"
              f" vs esridump  {same}  peak RSS {got['peak_rss_mib']:.1f} MiB")
    return 0


if __name__ == "__main__":
    command, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if command == "serve":
        asyncio.run(_serve(int(rest[0]), float(rest[1]), int(rest[2])))
    elif command == "esridump":
        _run_esridump(rest[0], Path(rest[1]))
    elif command == "ours":
        _run_ours(rest[0], Path(rest[1]), int(rest[2]))
    else:
        sys.exit(main(sys.argv[1:]))

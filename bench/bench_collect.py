"""Downloads benchmark: a regional collection built from many runs in an S3 API server, and the
coverage maps of thousands of sources.

    python -m bench.bench_collect [--runs 500] [--rows 1000000 5000000] [--sources 3000]

For each total of address rows: a fresh database (``oa_bench_collect_<hex>``, dropped at the
end) with ``--runs`` good runs of a finished set, each run's processed.zip (as the worker
writes it: README, VRT, a deflated CSV of rows/runs rows) in moto's S3 server, started as its
own process on loopback so that its memory is not counted. Then ``global`` is built in a child
process (``oa-machine collect --region global`` does the same), which reports its time and peak
RSS: the rows per second, and a peak that should not grow with the rows (the zip is streamed
into a multipart upload, members copied raw). Then the coverage maps of ``--sources`` made-up
sources (US counties, US states, countries, own geometries; two in three good) are drawn
in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import resource
import socket
import sys
import time
import uuid
import zipfile
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import numpy as np

from shared.db import create_pool, migrate

POSTGRES = os.environ.get("OA_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
HEADER = b"LON,LAT,NUMBER,STREET,UNIT,CITY,DISTRICT,REGION,POSTCODE,ID,HASH\r\n"
#: Distinct CSV payloads, spread over the US: runs share them (their content does not matter
#: to the copy, only their size).
PAYLOADS = 20
STATES = ("ca", "tx", "ny", "ks", "wa", "fl", "il", "pa", "oh", "co")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _csv(rows: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    lon = -120 + seed + rng.random(rows) * 2
    lat = 30 + seed * 0.5 + rng.random(rows) * 2
    lines = [f"{x:.7f},{y:.7f},{i},MAIN STREET,,SPRINGFIELD,,XX,12345,,{i:016x}\r\n"
             for i, (x, y) in enumerate(zip(lon.tolist(), lat.tolist(), strict=True))]
    return HEADER + "".join(lines).encode()


def processed_zip(base: str, rows: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as out:
        out.writestr("README.txt", "bench\n")
        out.writestr(f"{base}.vrt", "<OGRVRTDataSource/>\n")
        with out.open(f"{base}.csv", "w", force_zip64=True) as member:
            member.write(_csv(rows, seed))
    return buffer.getvalue()


async def seed(url: str, endpoint: str, bucket: str, runs: int, rows_per_run: int) -> int:
    from shared.storage import S3Storage

    storage = S3Storage(bucket, "", endpoint_url=endpoint)
    await storage.create_bucket()
    payloads = [processed_zip("bench/x", rows_per_run, i) for i in range(PAYLOADS)]
    pool = await create_pool(url, min_size=1, max_size=4)
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    try:
        set_id = await pool.fetchval(
            "INSERT INTO sets (created_at, finished_at, status) VALUES ($1, $1, 'done')"
            " RETURNING id", t0)
        compressed = 0
        for i in range(runs):
            path = f"sources/us/{STATES[i % len(STATES)]}/bench_{i:04d}.json"
            source = {"schema": 2, "layers": {"addresses": [
                {"name": "county", "license": {"text": "Public domain"}}]}}
            run_id = await pool.fetchval(
                """
                INSERT INTO runs (set_id, source_path, layer, entry_name, commit_sha, source,
                                  status, finished_at, state)
                VALUES ($1, $2, 'addresses', 'county', 'bench', $3, 'success', $4, $5)
                RETURNING id
                """, set_id, path, source, t0 + timedelta(seconds=i + 1),
                {"address count": rows_per_run, "feature count": rows_per_run})
            key = f"runs/{run_id}/processed.zip"
            data = payloads[i % PAYLOADS]
            compressed += len(data)
            await storage.put_bytes(key, data)
            await pool.execute("UPDATE runs SET outputs = $2 WHERE id = $1", run_id,
                               {"processed.zip": key})
        return compressed
    finally:
        await pool.close()
        await storage.close()


def child(args: argparse.Namespace) -> None:
    """Build ``global`` and print seconds, size and peak RSS as JSON (run in its own process)."""
    from services.scheduler.collect import Collector
    from shared.storage import S3Storage

    async def build() -> dict[str, Any]:
        storage = S3Storage(args.bucket, "", endpoint_url=args.endpoint)
        pool = await create_pool(args.database, min_size=1, max_size=2)
        try:
            started = time.perf_counter()
            built = await Collector(pool, storage).build_all(regions=["global"],
                                                             layers=["addresses"])
            seconds = time.perf_counter() - started
        finally:
            await pool.close()
            await storage.close()
        return {"seconds": seconds, "size_bytes": sum(b.size_bytes for b in built),
                "features": sum(b.feature_count for b in built), "zips": len(built)}

    result = asyncio.run(build())
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))


async def one_size(args: argparse.Namespace, endpoint: str, total_rows: int) -> dict[str, Any]:
    name = f"oa_bench_collect_{uuid.uuid4().hex[:10]}"
    url = f"{POSTGRES}/{name}"
    bucket = f"bench-{uuid.uuid4().hex[:10]}"
    await migrate(url)
    try:
        started = time.perf_counter()
        compressed = await seed(url, endpoint, bucket, args.runs, total_rows // args.runs)
        print(f"  seeded {args.runs} runs, {total_rows:,} rows, {compressed / 2**20:.0f} MiB "
              f"of processed.zip in {time.perf_counter() - started:.1f} s", flush=True)
        # In its own process: the figures are the collector's alone.
        child_process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.bench_collect", "child", "--database", url,
            "--endpoint", endpoint, "--bucket", bucket, stdout=asyncio.subprocess.PIPE)
        stdout, _ = await child_process.communicate()
        if child_process.returncode != 0:
            raise RuntimeError(f"the child failed with {child_process.returncode}")
        output = stdout.decode()
        result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
        result["rows"] = total_rows
        return result
    finally:
        conn = await asyncpg.connect(f"{POSTGRES}/postgres")
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


def made_up_sources(count: int) -> list[tuple[str, dict[str, Any], bool]]:
    from shared import boundaries

    rng = random.Random(13)
    counties = sorted(boundaries.us_counties())
    states = sorted(boundaries.us_states())
    countries = sorted(boundaries.countries())
    sources: list[tuple[str, dict[str, Any], bool]] = []
    for i in range(count):
        kind = i % 10
        if kind < 6:
            coverage: dict[str, Any] = {"US Census": {"geoid": rng.choice(counties)}}
        elif kind < 7:
            coverage = {"US Census": {"geoid": rng.choice(states)}}
        elif kind < 9:
            coverage = {"ISO 3166": {"alpha2": rng.choice(countries).upper()}}
        else:
            x, y = rng.uniform(-170, 170), rng.uniform(-50, 70)
            coverage = {"geometry": {"type": "Polygon", "coordinates": [[
                [x, y], [x + 0.5, y], [x + 0.5, y + 0.5], [x, y + 0.5], [x, y]]]}}
        sources.append((f"sources/xx/bench_{i}.json", {"coverage": coverage}, i % 3 != 0))
    return sources


def bench_maps(count: int) -> None:
    from services.scheduler.coverage import draw_all

    sources = made_up_sources(count)
    started = time.perf_counter()
    files, counts = draw_all(sources, datetime.now(UTC))
    seconds = time.perf_counter() - started
    sizes = ", ".join(f"{name} {len(data) / 1024:.0f} KiB" for name, data in files.items())
    print(f"coverage maps of {count:,} sources: {seconds:.1f} s (first drawing in this process, "
          f"boundaries loaded and projected); {counts}; {sizes}")
    started = time.perf_counter()
    draw_all(sources, datetime.now(UTC))
    print(f"  again in the same process: {time.perf_counter() - started:.1f} s")


async def bench(args: argparse.Namespace) -> None:
    port = _free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                           "AWS_DEFAULT_REGION")})
    server = await asyncio.create_subprocess_exec(
        os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
        "-p", str(port), env=env, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        print(f"collection 'global' of {args.runs} runs, moto S3 server on loopback "
              f"({os.cpu_count()} cores)")
        print(f"{'rows':>10} {'seconds':>8} {'rows/s':>10} {'zip MiB':>8} {'peak RSS MiB':>13}")
        for total in args.rows:
            result = await one_size(args, endpoint, total)
            print(f"{result['rows']:>10,} {result['seconds']:>8.1f} "
                  f"{result['rows'] / result['seconds']:>10,.0f} "
                  f"{result['size_bytes'] / 2**20:>8.0f} "
                  f"{result['peak_rss_bytes'] / 2**20:>13.0f}", flush=True)
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), timeout=30)
    bench_maps(args.sources)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_collect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="bench", choices=("bench", "child"),
                        help="child: build one collection (used by bench)")
    parser.add_argument("--runs", type=int, default=500, help="runs per size")
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000],
                        help="total address rows, one measurement each")
    parser.add_argument("--sources", type=int, default=3000, help="sources on the maps")
    parser.add_argument("--database", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--bucket", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode == "child":
        child(args)
    else:
        asyncio.run(bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Benchmark: the results site with a million runs.

Usage::

    .venv/bin/python -m bench.bench_site [--runs 1000000] [--sources 3000] [--sets 200]
        [--clients 20] [--requests 600] [--keep] [--database NAME]

Seeds a fresh database (``oa_bench_site_<hex>``, or ``--database NAME`` to reuse one seeded
earlier with ``--keep``) with ``runs`` runs: every entry of ``sources`` sources (one to four
entries each) in each of ``sets`` weekly sets (the newest still in progress), the rest in jobs
of three runs (pushes and pull requests); realistic ``index.json`` states, outputs and source
documents; workers. Each finished set stores its counts, as when a set finishes in production
(``shared.sets.set_counts``). The site's triggers are off while it loads and ``entries`` is rebuilt
after (``site_rebuild_entries()``), then ``VACUUM ANALYZE``. It prints how long that took.

Then it ``EXPLAIN``s every query of the site (``services/webhook/views/sql.py``'s catalogue)
and fails if any reads ``runs`` with a sequential scan, starts the webhook as a process (as in
production: JSON logs at info), and for each page sends ``requests`` requests from ``clients``
concurrent clients (each sends its next request when the last is answered), after a warm-up:
p50, p95, p99, max and requests per second. The target: p95 under 100 ms for each.

The seeding (:func:`seed`), the sample arguments (:func:`samples`) and the plan check
(:func:`explain_all`) are also what ``tests/webhook/test_site_plans.py`` runs at a small scale.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.bench_service import _SETTING_NAMES, _free_port, _wait_ready
from services.webhook.views import api, files, home, jobs, runs, sets, sources, state, workers
from services.webhook.views.sql import CATALOGUE, NO_CURSOR
from shared.db import migrate
from shared.sets import set_counts

SERVER = os.environ.get("OA_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
AMQP = os.environ.get("OA_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REPO = "openaddresses/openaddresses"
#: Every module whose queries are in the catalogue (imported for that).
VIEWS = (api, files, home, jobs, runs, sets, sources, state, workers)


# --- Seeding --------------------------------------------------------------------------------

_ENTRIES = """
CREATE TEMP TABLE bench_entries AS
SELECT row_number() OVER (ORDER BY i, layer, entry_name) AS n, source_path, layer, entry_name,
       100 + abs(hashint4(i)) % 2000000 AS base
FROM (
    SELECT i, format('sources/%s/r%s/source_%s.json',
                     (ARRAY['us', 'ca', 'de', 'fr', 'br', 'au', 'jp', 'mx'])[1 + i % 8],
                     i % 50, i) AS source_path
    FROM generate_series(1, $1::int) i
) s
CROSS JOIN LATERAL (VALUES ('addresses', 'county', true), ('addresses', 'city', i % 3 = 0),
                           ('parcels', 'parcels', i % 7 = 0),
                           ('buildings', 'buildings', i % 11 = 0)) AS e(layer, entry_name, has)
WHERE has
"""

# One row per run: $1 the first set's id. The row's fate from random() (seeded: the same
# database every time); the newest set is 60 % settled, 2 % running, the rest queued.
_RUN_ROW = """
    CASE WHEN settled THEN CASE WHEN r < 0.86 THEN 'success' WHEN r < 0.96 THEN 'failure'
                                ELSE 'skipped' END END AS status,
    CASE WHEN NOT settled THEN NULL WHEN r >= 0.96 THEN 'skip_source'
         WHEN r >= 0.86 THEN (ARRAY['download_failed', 'conform_failed', 'timeout',
                                    'no_features', 'invalid_source'])[1 + floor(r2 * 5)::int]
    END AS source_problem,
    CASE WHEN settled AND r >= 0.86 AND r < 0.96
         THEN format('GET http://data.example.org/%s.csv: HTTP 404 Not Found', entry_name)
    END AS error,
    round(base * (0.9 + r2 * 0.2))::bigint AS features
"""

_SET_RUNS = f"""
INSERT INTO runs (set_id, source_path, layer, entry_name, commit_sha, source, status,
                  source_problem, error, attempt, worker, created_at, queued_at, started_at,
                  finished_at, outputs, state)
SELECT set_id, source_path, layer, entry_name, sha,
       jsonb_build_object('schema', 2, 'coverage', jsonb_build_object('country', 'us'),
           'layers', jsonb_build_object(layer, jsonb_build_array(jsonb_build_object(
               'name', entry_name, 'data', 'http://data.example.org/' || n || '.csv',
               'protocol', 'http', 'license', jsonb_build_object('text', 'CC0'),
               'conform', jsonb_build_object('format', 'csv', 'number', 'NUM',
                                             'street', 'STREET', 'lon', 'X', 'lat', 'Y'))))),
       status, source_problem, error, 1, 'worker-' || (n % 20),
       created, created + interval '10 seconds',
       CASE WHEN status IS NOT NULL OR running THEN created + interval '1 minute' END,
       CASE WHEN status IS NOT NULL
            THEN created + interval '1 minute' + (30 + r2 * 270) * interval '1 second' END,
       CASE WHEN status IS NOT NULL THEN jsonb_build_object(
            'index.json', prefix || 'index.json', 'output.txt', prefix || 'output.txt',
            'out.csv', prefix || 'out.csv', 'out.geojson', prefix || 'out.geojson',
            'processed.zip', prefix || 'processed.zip', 'sample.json', prefix || 'sample.json',
            'preview.png', prefix || 'preview.png') ELSE '{{}}' END,
       CASE WHEN status IS NOT NULL THEN jsonb_build_object(
            'source', source_path, 'layer', layer, 'name', entry_name, 'skipped', false,
            'cache', 'cache.zip', 'sample', 'sample.json', 'website', 'https://example.org',
            'license', 'CC0', 'geometry type', 'Point',
            'address count', CASE WHEN status = 'success' AND layer = 'addresses'
                                  THEN features END,
            'feature count', CASE WHEN status = 'success' THEN features END,
            'version', to_char(created, 'YYYYMMDD'), 'fingerprint', md5(prefix),
            'cache time', round((r * 60)::numeric, 3), 'process time',
            round((r2 * 240)::numeric, 3),
            'processed', CASE WHEN status = 'success' THEN 'out.csv' END,
            'processed zip', CASE WHEN status = 'success' THEN 'processed.zip' END,
            'output', 'output.txt', 'preview', 'preview.png', 'attribution required', true,
            'attribution name', 'County of ' || n, 'share-alike', false,
            'code version', '0.1.0', 'source problem', source_problem, 'error', error,
            'processed at', created + interval '5 minutes', 'tests passed', true,
            'bounds', jsonb_build_array(-122.5, 37.2, -121.5, 38.1),
            'dropped rows', 0, 'attribute counts', jsonb_build_object(
                'number', features, 'street', features, 'city', features / 2))
       ELSE '{{}}' END
FROM (
    SELECT *, {_RUN_ROW}
    FROM (
        SELECT s.id AS set_id, e.n, e.source_path, e.layer, e.entry_name, e.base,
               s.created_at + (e.n::float / $2) * interval '10 hours' AS created,
               md5(s.id::text) || 'abcdefgh' AS sha,
               format('runs/s%s/e%s/', s.id, e.n) AS prefix,
               s.finished_at IS NOT NULL OR e.n < $2 * 0.6 AS settled,
               s.finished_at IS NULL AND e.n >= $2 * 0.6 AND e.n < $2 * 0.62 AS running,
               random() AS r, random() AS r2
        FROM sets s CROSS JOIN bench_entries e
        WHERE s.id = $1
    ) base_rows
) rows
"""

_JOB_RUNS = f"""
INSERT INTO runs (job_id, source_path, layer, entry_name, commit_sha, status, source_problem,
                  error, attempt, worker, created_at, queued_at, started_at, finished_at,
                  outputs, state)
SELECT job_id, source_path, layer, entry_name, sha, status, source_problem, error, 1,
       'worker-' || (n % 20), created, created,
       CASE WHEN status IS NOT NULL THEN created + interval '5 seconds' END,
       CASE WHEN status IS NOT NULL THEN created + interval '40 seconds' END,
       CASE WHEN status IS NOT NULL THEN jsonb_build_object(
            'index.json', prefix || 'index.json', 'output.txt', prefix || 'output.txt',
            'out.csv', prefix || 'out.csv', 'out.geojson', prefix || 'out.geojson',
            'processed.zip', prefix || 'processed.zip') ELSE '{{}}' END,
       CASE WHEN status IS NOT NULL THEN jsonb_build_object(
            'source', source_path, 'layer', layer, 'name', entry_name,
            'feature count', CASE WHEN status = 'success' THEN features END,
            'address count', CASE WHEN status = 'success' THEN features END,
            'source problem', source_problem, 'processed', 'out.csv', 'output', 'output.txt',
            'code version', '0.1.0')
       ELSE '{{}}' END
FROM (
    SELECT *, {_RUN_ROW}
    FROM (
        SELECT j.id AS job_id, e.n, e.source_path, e.layer, e.entry_name, e.base,
               j.created_at AS created, j.sha, format('runs/j%s/e%s/', j.id, e.n) AS prefix,
               j.finished_at IS NOT NULL AS settled, random() AS r, random() AS r2
        FROM jobs j CROSS JOIN generate_series(0, $2 - 1) k
        JOIN bench_entries e ON e.n = 1 + (j.id * 7 + k * 1117) % $1
    ) base_rows
) rows
"""


async def seed(conn: asyncpg.Connection, *, runs: int, sources: int, sets: int,
               say: Callable[[str], None] = print) -> dict[str, int]:
    """Fill an empty, migrated database; returns what it made."""
    await conn.execute("SELECT setseed(0.42)")
    # The triggers that keep `entries` up to date are off while loading; it is rebuilt after.
    await conn.execute("SET session_replication_role = replica")
    await conn.execute(_ENTRIES, sources)
    entries = await conn.fetchval("SELECT count(*) FROM bench_entries")
    await conn.execute(
        """
        INSERT INTO sets (kind, created_at, finished_at, status)
        SELECT 'weekly', now() - ($1 - g) * interval '7 days' - interval '2 hours',
               CASE WHEN g < $1 THEN now() - ($1 - g) * interval '7 days' + interval '18 hours'
               END,
               CASE WHEN g < $1 THEN 'done' END
        FROM generate_series(1, $1::int) g
        """, sets)
    set_ids = [row["id"] for row in await conn.fetch("SELECT id FROM sets ORDER BY id")]
    started = time.perf_counter()
    for number, set_id in enumerate(set_ids, 1):
        await conn.execute(_SET_RUNS, set_id, entries)
        if number % 20 == 0:
            say(f"  {number} sets of {entries:,} runs ({time.perf_counter() - started:.0f} s)")
    # Each finished set stores its counts, as shared/sets.settle_sets does when one finishes.
    for set_id in set_ids[:-1]:
        await store_counts(conn, set_id)
    job_runs = max(runs - entries * sets, 0)
    per_job = 3
    job_count = job_runs // per_job
    await conn.execute(
        """
        INSERT INTO jobs (delivery_id, event, repo, sha, ref, pr_number, head_repo, status,
                          created_at, finished_at)
        SELECT 'bench-' || g, CASE WHEN g % 5 < 3 THEN 'push' ELSE 'pull_request' END, $2,
               md5(g::text) || 'abcdefgh',
               CASE WHEN g % 5 < 3 THEN 'refs/heads/main' ELSE 'refs/pull/' || g || '/head' END,
               CASE WHEN g % 5 >= 3 THEN g END,
               CASE WHEN g % 5 >= 3 THEN 'contributor/openaddresses' ELSE $2 END,
               CASE WHEN g > $1 - 5 THEN NULL WHEN g % 9 = 0 THEN 'failure' ELSE 'success' END,
               now() - ($1 - g) * interval '1 hour' - interval '1 minute',
               CASE WHEN g <= $1 - 5 THEN now() - ($1 - g) * interval '1 hour' END
        FROM generate_series(1, $1::int) g
        """, job_count, REPO)
    if job_count:
        await conn.execute(_JOB_RUNS, entries, per_job)
    await conn.execute(
        """
        INSERT INTO workers (name, hostname, pid, state, run_id, last_seen_at, version)
        SELECT 'worker-' || g, 'node-' || (g % 4), 1000 + g,
               CASE WHEN g < 12 THEN 'running' ELSE 'idle' END,
               CASE WHEN g < 12 THEN (SELECT min(id) FROM runs WHERE status IS NULL) + g END,
               now() - CASE WHEN g < 16 THEN interval '10 seconds'
                            WHEN g < 18 THEN interval '12 minutes' ELSE interval '25 minutes'
                       END, '0.1.0'
        FROM generate_series(0, 19) g
        """)
    await conn.execute("SET session_replication_role = origin")
    await conn.execute("SELECT site_rebuild_entries()")
    return {"entries": entries, "sets": sets, "jobs": job_count,
            "runs": await conn.fetchval("SELECT count(*) FROM runs")}


async def store_counts(conn: asyncpg.Connection, set_id: int) -> None:
    counts = await set_counts(conn, set_id)
    await conn.execute("UPDATE sets SET counts = $2::jsonb WHERE id = $1", set_id,
                       json.dumps(counts))


# --- Plans ----------------------------------------------------------------------------------


async def samples(conn: asyncpg.Connection) -> dict[str, Any]:
    """An argument for every ``sample`` name of the catalogue's queries, from the data."""
    job = await conn.fetchrow(
        "SELECT id, repo, pr_number FROM jobs WHERE pr_number IS NOT NULL ORDER BY id DESC "
        "LIMIT 1")
    run = await conn.fetchrow(
        "SELECT id, source_path, layer, entry_name FROM runs WHERE status = 'success' "
        "AND set_id IS NOT NULL ORDER BY id DESC LIMIT 1")
    set_ids = [row["id"] for row in await conn.fetch(
        "SELECT id FROM sets ORDER BY id DESC LIMIT 25")]
    job_ids = [row["id"] for row in await conn.fetch(
        "SELECT id FROM jobs ORDER BY id DESC LIMIT 50")]
    return {
        "before": NO_CURSOR, "limit": 50, "job_status": "failure", "repo": job["repo"],
        "pr_number": job["pr_number"], "job_id": job["id"], "job_ids": job_ids,
        "set_id": set_ids[0], "set_ids": set_ids, "run_id": run["id"],
        "source_path": run["source_path"], "layer": run["layer"],
        "entry_name": run["entry_name"], "finished_before": await conn.fetchval("SELECT now()"),
        "after_path": "", "rank": 0, "problem": "download_failed", "after_rank": -1,
        "after_id": 0, "run_status": "skipped",
        "inactive_after": timedelta(minutes=10), "offline_after": timedelta(minutes=20),
        "after_name": "",
    }


def _scans(node: dict[str, Any]) -> list[dict[str, Any]]:
    found = [node]
    for child in node.get("Plans", []):
        found.extend(_scans(child))
    return found


async def runs_scans(conn: asyncpg.Connection, text: str, *args: Any) -> list[str]:
    """How the plan of ``text`` reads ``runs``: ``Index Only Scan using runs_pkey``, ..."""
    plan = json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {text}", *args))
    return [
        f"{node['Node Type']}" + (f" using {node['Index Name']}" if "Index Name" in node
                                  else "")
        for node in _scans(plan[0]["Plan"]) if node.get("Relation Name") == "runs"
    ]


async def explain_all(conn: asyncpg.Connection, values: dict[str, Any]) -> dict[str, list[str]]:
    """Each catalogue query's scans of ``runs``, with the ``values`` of :func:`samples`."""
    found: dict[str, list[str]] = {}
    for name, query in sorted(CATALOGUE.items()):
        found[name] = await runs_scans(conn, query.text,
                                       *[values[sample] for sample in query.sample])
    return found


def sequential(plans: dict[str, list[str]]) -> list[str]:
    """The queries that read ``runs`` with a sequential scan."""
    return [name for name, scans in plans.items() if any("Seq Scan" in s for s in scans)]


# --- Load -----------------------------------------------------------------------------------


async def _hammer(session: aiohttp.ClientSession, paths: Callable[[], str], *, clients: int,
                  requests: int) -> tuple[list[float], float]:
    """``requests`` GETs from ``clients`` concurrent clients; latencies and the wall time."""
    latencies: list[float] = []
    left = requests

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            path = paths()
            began = time.perf_counter()
            async with session.get(path, allow_redirects=False) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"GET {path}: HTTP {response.status}")
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return sorted(latencies), time.perf_counter() - began


def _line(name: str, latencies: list[float], wall_s: float) -> str:
    def at(share: float) -> float:
        return latencies[min(len(latencies) - 1, int(len(latencies) * share))] * 1000

    return (f"  {name:<28} p50 {statistics.median(latencies) * 1000:6.1f} ms  "
            f"p95 {at(0.95):6.1f} ms  p99 {at(0.99):6.1f} ms  "
            f"max {latencies[-1] * 1000:6.1f} ms  {len(latencies) / wall_s:6.0f} req/s")


async def bench(args: argparse.Namespace) -> int:
    name = args.database or f"oa_bench_site_{uuid.uuid4().hex[:10]}"
    fresh = not args.database
    try:
        return await _bench(args, f"{SERVER}/{name}", fresh=fresh)
    finally:
        if fresh and not args.keep:
            admin = await asyncpg.connect(f"{SERVER}/postgres")
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await admin.close()
        elif fresh:
            print(f"kept the database: --database {name}")


async def _bench(args: argparse.Namespace, url: str, *, fresh: bool) -> int:
    if fresh:
        await migrate(url)
    conn = await asyncpg.connect(url)
    failed = 0
    try:
        if fresh:
            began = time.perf_counter()
            made = await seed(conn, runs=args.runs, sources=args.sources, sets=args.sets)
            seeded = time.perf_counter() - began
            await conn.execute("VACUUM ANALYZE")
            print(f"seeded {made['runs']:,} runs ({made['entries']:,} entries of "
                  f"{args.sources:,} sources × {made['sets']} sets, {made['jobs']:,} jobs) in "
                  f"{seeded:.0f} s; VACUUM ANALYZE {time.perf_counter() - began - seeded:.0f} s",
                  flush=True)
        size = await conn.fetchval("SELECT pg_size_pretty(pg_total_relation_size('runs'))")
        print(f"runs: {await conn.fetchval('SELECT count(*) FROM runs'):,} rows, {size}")
        values = await samples(conn)
        plans = await explain_all(conn, values)
        bad = sequential(plans)
        print(f"EXPLAIN: {len(plans)} queries; sequential scans of runs: {bad or 'none'}")
        if args.plans:
            for query_name, scans in plans.items():
                print(f"  {query_name}: {', '.join(scans) or '(no runs)'}")
        failed |= bool(bad)
        paths = await conn.fetch("SELECT DISTINCT source_path FROM entries")
        set_ids = [row["id"] for row in await conn.fetch("SELECT id FROM sets")]
        open_set = max(set_ids)
        newest_run = await conn.fetchval("SELECT max(id) FROM runs")
        newest_job = await conn.fetchval("SELECT max(id) FROM jobs")
    finally:
        await conn.close()
    names = [row["source_path"].removeprefix("sources/").removesuffix(".json") for row in paths]
    pick = random.Random(7)
    pages: list[tuple[str, Callable[[], str]]] = [
        ("/", lambda: "/"),
        ("/jobs/", lambda: "/jobs/"),
        ("/jobs/?before=<random>", lambda: f"/jobs/?before={pick.randint(50, newest_job)}"),
        ("/sources/{path}", lambda: f"/sources/{pick.choice(names)}"),
        ("/sets/{id} (any)", lambda: f"/sets/{pick.choice(set_ids)}"),
        ("/sets/{id} (in progress)", lambda: f"/sets/{open_set}"),
        ("/state.txt", lambda: "/state.txt"),
        ("/api/runs", lambda: "/api/runs"),
        ("/api/runs?before=<random>", lambda: f"/api/runs?before={pick.randint(50, newest_run)}"),
    ]
    with tempfile.TemporaryDirectory(prefix="oa-bench-site-") as tmp:
        # --processes N: N webhook processes, as N replicas behind a load balancer (the k8s
        # base runs at least two); the clients take them in turn, request by request.
        ports = [_free_port() for _ in range(args.processes)]
        webhooks = []
        for port in ports:
            env = {
                **{k: v for k, v in os.environ.items() if k.upper() not in _SETTING_NAMES},
                "DATABASE_URL": url, "AMQP_URL": AMQP, "STORAGE_URL": Path(tmp).as_uri(),
                "HTTP_PORT": str(port), "LOG_LEVEL": "info", "LOG_FORMAT": "json",
                "WEBHOOK_SECRETS": "bench-secret",
            }
            webhooks.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services", "webhook", env=env,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL))
        try:
            bases = [f"http://127.0.0.1:{port}" for port in ports]
            for base in bases:
                await _wait_ready(base)
            turn = itertools.cycle(bases)
            print(f"{args.clients} concurrent clients, {args.requests} requests per page "
                  f"(after {args.warmup} to warm up), {args.processes} webhook process(es):")
            connector = aiohttp.TCPConnector(limit=args.clients * args.processes)
            async with aiohttp.ClientSession(connector=connector) as session:
                for label, path in pages:
                    def address(path: Callable[[], str] = path) -> str:
                        return next(turn) + path()

                    await _hammer(session, address, clients=args.clients, requests=args.warmup)
                    latencies, wall_s = await _hammer(session, address, clients=args.clients,
                                                      requests=args.requests)
                    print(_line(label, latencies, wall_s), flush=True)
                    p95 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.95))]
                    failed |= p95 >= 0.100
        finally:
            for webhook in webhooks:
                with contextlib.suppress(ProcessLookupError):
                    webhook.terminate()
                await webhook.wait()
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_site", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--sources", type=int, default=3000)
    parser.add_argument("--sets", type=int, default=200)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--processes", type=int, default=1,
                        help="webhook processes the clients take in turn (replicas)")
    parser.add_argument("--keep", action="store_true", help="keep the seeded database")
    parser.add_argument("--database", help="reuse a database seeded with --keep")
    parser.add_argument("--plans", action="store_true", help="print every query's scans")
    return asyncio.run(bench(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

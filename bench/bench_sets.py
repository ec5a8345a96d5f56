"""Benchmark: batch sets, on the real PostgreSQL and RabbitMQ.

Usage::

    .venv/bin/python -m bench.bench_sets create [--files 3000] [--entries 5000] [--weeks 4]
    .venv/bin/python -m bench.bench_sets simulate [--runs 5000] [--workers 10,20,50]
                                                  [--scale 1000] [--order longest|none]

``create``: a GitHub stand-in (in a process of its own) serves a tree of ``files`` source files
with ``entries`` layer entries in all, made from the real fixture sources; the database holds
``weeks`` earlier weekly sets of them (the runs the longest-first order reads). A fresh process
then does what the scheduler's batch slot does, and queues the set's first window as the
dispatcher would: it prints the seconds and its peak RSS. Three times: every blob new, no blob
changed (a new head commit), 1 % of the blobs changed.

``simulate``: a weekly set of ``runs`` entries (one per file) whose durations follow a
long-tailed (log-normal) distribution: median 45 s, most under 5 min, a few hours long, capped
at 5 h; seeded. Last week's duration of each entry is in the database, this week's is within
±25 % of it. The real dequeuer feeds the set to ``N`` workers, processes that heartbeat like
the real worker and sleep for the run's duration divided by ``scale``. Prints the set's wall
time in simulated hours, against the bound no schedule can beat (the total work divided by
``N``, or the longest run), and the deepest the tasks queue got. ``--order none`` leaves out
the history, so the set runs in path order instead of longest first.

Each measurement uses a fresh database and virtual host, removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import hashlib
import json
import math
import multiprocessing
import os
import random
import resource
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import asyncpg

from bench.bench_service import _SETTING_NAMES, fresh_backends, stop_processes
from services.demo.github import GitHubStandIn
from shared.config import Settings
from shared.db import create_pool
from shared.sources import list_entries, load_source

REPO = "openaddresses/openaddresses"
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "oa-sources"


# --- the tree -----------------------------------------------------------------------------------


def make_tree(files: int, entries: int) -> dict[str, bytes]:
    """``files`` source files with ``entries`` address entries in all, each file shaped like
    one of the real fixture sources (its coverage, conform and protocol), with data URLs and
    names of its own."""
    if entries < files:
        raise SystemExit("--entries must be at least --files")
    templates = []
    for path in sorted(FIXTURES.rglob("*.json")):
        source = load_source(path.read_bytes())
        addresses = (source.get("layers") or {}).get("addresses") or []
        if addresses:
            templates.append((source, addresses[0]))
    extra = entries - files  # spread over the first files, one more entry each
    tree: dict[str, bytes] = {}
    for index in range(files):
        source, entry = templates[index % len(templates)]
        count = 1 + extra // files + (1 if index < extra % files else 0)
        layer = []
        for number in range(count):
            copied = copy.deepcopy(entry)
            copied["name"] = f"part{number}"
            copied["data"] = f"https://data.example.org/{index}/{number}.csv"
            layer.append(copied)
        made = {**copy.deepcopy(source), "layers": {"addresses": layer}}
        tree[f"sources/zz/r{index // 100:02d}/s{index:05d}.json"] = json.dumps(
            made, indent=4).encode()
    got = sum(len(list_entries(load_source(content))) for content in tree.values())
    if got != entries:
        raise AssertionError(f"made {got} entries, not {entries}")
    return tree


def _serve_tree(pipe: Connection) -> None:
    """The GitHub stand-in, in a process of its own: commands ("tree", head, files) and
    ("stop",) come through ``pipe``; answers the URL first, then "ok" to each command."""

    async def serve() -> None:
        stand_in = GitHubStandIn()
        pipe.send(await stand_in.start())
        loop = asyncio.get_running_loop()
        while True:
            command = await loop.run_in_executor(None, pipe.recv)
            if command[0] == "stop":
                break
            stand_in.set_tree(REPO, "master", command[1], command[2])
            pipe.send("ok")
        await stand_in.stop()

    asyncio.run(serve())


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


async def _history(pool: asyncpg.Pool, keys: list[tuple[str, str, str]],
                   durations: dict[tuple[str, str, str], float], weeks: int) -> None:
    """``weeks`` earlier weekly sets of ``keys``, finished, with those durations (seconds)."""
    now = datetime.now(UTC)
    for week in range(weeks, 0, -1):
        finished = now - timedelta(days=7 * week)
        set_id = await pool.fetchval(
            "INSERT INTO sets (kind, created_at, finished_at, status) VALUES"
            " ('weekly', $1, $1, 'done') RETURNING id", finished)
        await pool.execute(
            """
            INSERT INTO runs (set_id, source_path, layer, entry_name, status, started_at,
                              finished_at, state)
            SELECT $1, k.path, k.layer, k.name, 'success',
                   $2::timestamptz - make_interval(secs => k.seconds), $2, '{}'
            FROM unnest($3::text[], $4::text[], $5::text[], $6::float8[])
                 AS k(path, layer, name, seconds)
            """,
            set_id, finished, [k[0] for k in keys], [k[1] for k in keys],
            [k[2] for k in keys], [durations[k] for k in keys],
        )


def _keys(tree: dict[str, bytes]) -> list[tuple[str, str, str]]:
    return [(path, ref.layer, ref.name) for path, content in tree.items()
            for ref in list_entries(load_source(content))]


# --- create -------------------------------------------------------------------------------


def _measure_env(database_url: str, amqp_url: str, github_url: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if k.upper() not in _SETTING_NAMES},
        "DATABASE_URL": database_url, "AMQP_URL": amqp_url, "GITHUB_API_URL": github_url,
        "LOG_LEVEL": "warning",
    }


async def _measure_once(env: dict[str, str]) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.bench_sets", "_make", env=env,
        stdout=asyncio.subprocess.PIPE)
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError("the measured process failed")
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


async def bench_create(files: int, entries: int, weeks: int) -> None:
    tree = make_tree(files, entries)
    rng = random.Random(7)
    keys = _keys(tree)
    durations = {key: _duration(rng) for key in keys}
    parent, child = multiprocessing.Pipe()
    server = multiprocessing.get_context("spawn").Process(target=_serve_tree, args=(child,))
    server.start()
    github_url = parent.recv()
    try:
        async with fresh_backends() as (database_url, amqp_url):
            pool = await create_pool(database_url)
            await _history(pool, keys, durations, weeks)
            await pool.close()
            env = _measure_env(database_url, amqp_url, github_url)
            print(f"{files:,} files, {len(keys):,} entries, {weeks} weeks of history "
                  f"({weeks * len(keys):,} runs)")
            changed = dict(tree)
            for index, path in enumerate(sorted(changed)):
                if index % 100 == 0:
                    changed[path] = changed[path] + b"\n"
            for label, files_now in (("every blob new", tree), ("no blob changed", tree),
                                     ("1 % of blobs changed", changed)):
                parent.send(("tree", _sha(label), files_now))
                parent.recv()
                result = await _measure_once(env)
                print(f"{label:>22}: {result['seconds']:6.2f} s to make set "
                      f"{result['set']} ({result['runs']:,} runs, {result['fetched']:,} files "
                      f"read) and queue its first {result['queued']}; peak RSS "
                      f"{result['max_rss_mb']:.0f} MB")
    finally:
        parent.send(("stop",))
        server.join(30)


async def _make() -> None:
    """The measured process: what the batch slot does, then the dispatcher's first window."""
    from services.scheduler.batch import make_set
    from shared.broker import Broker
    from shared.db import create_pool
    from shared.dispatch import BATCH, dispatch
    from shared.github import GitHub

    settings = Settings()
    started = time.perf_counter()
    pool = await create_pool(settings.database_url, min_size=1, max_size=4)
    github = GitHub.open(settings.github_api_url, "token")
    broker = await Broker.connect(settings.amqp_url)
    try:
        made = await make_set(pool, github, settings)
        result = await dispatch(pool, broker, run_timeout_s=settings.run_timeout_s,
                                public_base_url=settings.public_base_url, limit=BATCH,
                                batch_room=10)
        seconds = time.perf_counter() - started
    finally:
        await broker.close()
        await github.close()
        await pool.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "set": made.set_id, "runs": made.runs,
                      "fetched": made.fetched, "queued": result.queued, "max_rss_mb": peak}))


# --- simulate -----------------------------------------------------------------------------------


def _duration(rng: random.Random) -> float:
    """A run's duration in seconds: log-normal, median 45 s, capped to [3 s, 5 h]."""
    return min(max(rng.lognormvariate(math.log(45.0), 1.3), 3.0), 5 * 3600.0)


@contextlib.asynccontextmanager
async def _processes(commands: list[list[str]], env: dict[str, str]) -> AsyncIterator[None]:
    processes = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", *command, env=env, stdout=asyncio.subprocess.DEVNULL)
        for command in commands]
    try:
        yield
    finally:
        await stop_processes(processes)


async def bench_simulate(runs: int, workers: list[int], scale: float, order: str) -> None:
    rng = random.Random(11)
    tree = {f"sources/zz/r{index // 100:02d}/s{index:05d}.json": json.dumps({
        "schema": 2, "coverage": {"country": "zz"},
        "layers": {"addresses": [{"name": "city", "protocol": "http", "data":
                                  f"https://data.example.org/{index}.csv",
                                  "conform": {"format": "csv", "number": "N", "street": "S",
                                              "lon": "X", "lat": "Y"}}]},
    }).encode() for index in range(runs)}
    keys = _keys(tree)
    last_week = {key: _duration(rng) for key in keys}
    this_week = {key[0]: last_week[key] * rng.uniform(0.75, 1.25) for key in keys}
    total = sum(this_week.values())
    longest = max(this_week.values())
    print(f"{runs:,} runs, {total / 3600:,.0f} h of work in all, median "
          f"{sorted(this_week.values())[runs // 2]:.0f} s, longest {longest / 3600:.1f} h; "
          f"1 s here is {scale:g} s simulated; order: "
          f"{'longest first' if order == 'longest' else 'by path (no history)'}")
    for count in workers:
        async with fresh_backends() as (database_url, amqp_url):
            stand_in = GitHubStandIn()
            github_url = await stand_in.start()
            stand_in.set_tree(REPO, "master", _sha(f"sim-{count}"), tree)
            with tempfile.TemporaryDirectory(prefix="oa-bench-sets-") as tmp:
                durations_file = Path(tmp, "durations.json")
                durations_file.write_text(json.dumps(this_week))
                env = {**_measure_env(database_url, amqp_url, github_url),
                       "METRICS_PORT": "0", "WORK_DIR": tmp}
                pool = await create_pool(database_url)
                if order == "longest":
                    await _history(pool, keys, last_week, 1)
                sleepers = [["bench.bench_sets", "_sleeper", str(durations_file), str(scale),
                             f"w{index}"] for index in range(count)]
                async with _processes([["services", "dequeuer"], *sleepers], env):
                    await _wait_workers(pool, count)
                    wall, startup, deepest = await _run_set(pool, Settings(
                        database_url=database_url, amqp_url=amqp_url, github_api_url=github_url))
                await pool.close()
                gaps = [float(line) for path in Path(tmp).glob("*.gaps")
                        for line in path.read_text().split()]
            await stand_in.stop()
        bound = max(total / count, longest)
        # Each worker's gaps are real seconds, scaled up with the rest; a real week has the
        # same gaps unscaled. Taking the mean gap of a worker's runs out of the wall time gives
        # the set's simulated time as it would be, the gaps at their real length.
        gap_per_worker = sum(gaps) / count
        simulated = (wall - gap_per_worker) * scale + gap_per_worker
        print(f"{count:>3} workers: {simulated / 3600:6.1f} h simulated "
              f"(bound {bound / 3600:5.1f} h, +{(simulated / bound - 1):.0%}); "
              f"{wall:.0f} s here from the first run's start ({startup:.1f} s after the set was "
              f"made), of which {gap_per_worker:.1f} s per worker between runs "
              f"(mean {statistics.mean(gaps) * 1000:.0f} ms, p95 "
              f"{sorted(gaps)[int(len(gaps) * 0.95)] * 1000:.0f} ms); "
              f"tasks queue at most {deepest} deep")


async def _wait_workers(pool: asyncpg.Pool, count: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if await pool.fetchval("SELECT count(*) FROM workers") >= count:
            return
        await asyncio.sleep(0.5)
    raise RuntimeError("the workers did not all report")


async def _run_set(pool: asyncpg.Pool, settings: Settings) -> tuple[float, float, int]:
    """Make the set and wait for it to finish: the real seconds from the first run's start to
    the set's end, from making the set to its first run's start (the dequeuer's next round,
    at most 10 s), and the deepest the tasks queue got."""
    from services.scheduler.batch import make_set
    from shared.broker import Broker
    from shared.github import GitHub
    from shared.messages import QUEUE_TASKS

    github = GitHub.open(settings.github_api_url, "token")
    broker = await Broker.connect(settings.amqp_url)
    deepest = 0
    try:
        made_at = await pool.fetchval("SELECT now()")
        made = await make_set(pool, github, settings)
        while await pool.fetchval("SELECT finished_at FROM sets WHERE id = $1",
                                  made.set_id) is None:
            deepest = max(deepest, (await broker.queue_depth(QUEUE_TASKS))[0])
            await asyncio.sleep(0.25)
        first, last = await pool.fetchrow(
            "SELECT min(started_at), max(finished_at) FROM runs WHERE set_id = $1", made.set_id)
        return (last - first).total_seconds(), (first - made_at).total_seconds(), deepest
    finally:
        await broker.close()
        await github.close()


async def _sleeper(durations_file: str, scale: float, name: str) -> None:
    """A worker that sleeps for each run's duration / ``scale``: the real protocol (heartbeat
    naming the run before the ack, heartbeats while idle, a `done` at the end)."""
    from shared.broker import Broker
    from shared.feed import TaskFeed
    from shared.messages import (
        EXCHANGE_DONE,
        QUEUE_TASKS,
        ROUTE_DONE,
        ROUTE_HEARTBEAT,
        Done,
        Heartbeat,
        Task,
    )

    durations: dict[str, float] = json.loads(Path(durations_file).read_text())
    settings = Settings()
    broker = await Broker.connect(settings.amqp_url)

    async def beat(task: Task | None) -> None:
        await broker.publish(EXCHANGE_DONE, ROUTE_HEARTBEAT, Heartbeat(
            worker=name, hostname=socket.gethostname(), pid=os.getpid(),
            run_id=task.run_id if task else None, attempt=task.attempt if task else None,
            state="running" if task else "idle",
            deadline_at=datetime.now(UTC) + timedelta(hours=1) if task else None))

    async def idle_beats() -> None:
        while True:
            await beat(None)
            await asyncio.sleep(5)

    beating = asyncio.create_task(idle_beats())
    feed = TaskFeed(broker, QUEUE_TASKS, (Task,), capacity=1, before_ack=beat)
    # The real seconds between finishing a run and starting the next: the system's own
    # overhead per run, which the scaled sleep does not shrink. One line per run.
    gaps = Path(durations_file).with_name(f"{name}.gaps").open("a", buffering=1)
    released: float | None = None
    try:
        while True:
            task = await feed.next()
            if released is not None:
                gaps.write(f"{time.perf_counter() - released:.4f}\n")
            started = datetime.now(UTC)
            await asyncio.sleep(durations[task.source_path] / scale)
            await broker.publish(EXCHANGE_DONE, ROUTE_DONE, Done(
                run_id=task.run_id, attempt=task.attempt, worker=name, status="success",
                started_at=started, state={"feature count": 100}))
            feed.release()
            released = time.perf_counter()
    finally:
        gaps.close()
        beating.cancel()
        await feed.close()
        await broker.close()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_sets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    create = modes.add_parser("create")
    create.add_argument("--files", type=int, default=3000)
    create.add_argument("--entries", type=int, default=5000)
    create.add_argument("--weeks", type=int, default=4)
    simulate = modes.add_parser("simulate")
    simulate.add_argument("--runs", type=int, default=5000)
    simulate.add_argument("--workers", default="10,20,50")
    simulate.add_argument("--scale", type=float, default=1000.0)
    simulate.add_argument("--order", choices=("longest", "none"), default="longest")
    modes.add_parser("_make")
    sleeper = modes.add_parser("_sleeper")
    sleeper.add_argument("durations")
    sleeper.add_argument("scale", type=float)
    sleeper.add_argument("name")
    args = parser.parse_args(argv)
    if args.mode == "create":
        asyncio.run(bench_create(args.files, args.entries, args.weeks))
    elif args.mode == "simulate":
        asyncio.run(bench_simulate(args.runs, [int(n) for n in args.workers.split(",")],
                                   args.scale, args.order))
    elif args.mode == "_make":
        asyncio.run(_make())
    else:
        with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
            asyncio.run(_sleeper(args.durations, args.scale, args.name))


if __name__ == "__main__":
    main(sys.argv[1:])

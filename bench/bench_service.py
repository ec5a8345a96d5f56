"""Benchmark: the service around the engine, on the real PostgreSQL and RabbitMQ.

Usage::

    .venv/bin/python -m bench.bench_service settle [--runs 5000]
    .venv/bin/python -m bench.bench_service pipeline [--runs 1000] [--rate 3] [--workers 2]
    .venv/bin/python -m bench.bench_service hooks [--deliveries 50] [--sources 20]

``settle``: the dequeuer alone. ``runs`` open runs (ten per job) get their `done` published
into the `done` queue first; then a :class:`Dequeuer` starts in this process and the clock runs
until every run is settled (each settlement a transaction: the run, the job once its last run
is in, the commit status into the outbox). Prints runs per second.

``hooks``: the webhook alone as a process: ``deliveries`` pull requests of ``sources`` changed
sources each are posted at once; prints the time to answer ``POST /hook`` and from the post to
the ``pending`` status received by the GitHub stand-in (p50, p99, max).

``pipeline``: the whole system as real processes (``python -m services webhook``, ``worker`` ×
``workers``, ``dequeuer``), GitHub and a data provider played in this process. ``runs`` pushes
of one new source each (a two-row CSV) arrive at ``rate`` per second, below capacity. For each
push: *latency* is push sent → the final commit status received by the GitHub stand-in; the
*pipeline's own cost* is that latency minus the run's own ``process time`` (its child
process, from index.json). Prints p50, p99 and max of both.

Each mode uses a fresh database (``oa_bench_<hex>``) and virtual host, removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import aiohttp
import asyncpg
from aiohttp import web

from services.demo.demo import deliver, push_payload
from services.demo.github import GitHubStandIn
from services.dequeuer.service import PREFETCH, Dequeuer
from shared.broker import Broker
from shared.config import Settings
from shared.db import create_pool, migrate
from shared.github import GitHub
from shared.logging import configure_logging
from shared.messages import EXCHANGE_DONE, ROUTE_DONE, Done

SERVER = os.environ.get("OA_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
AMQP = os.environ.get("OA_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")
REPO = "bench/sources"
SECRET = "bench-secret"
CSV = b"lon,lat,number,street\n-100.1,38.1,1,Elm St\n-100.2,38.2,2,Oak Ave\n"


@contextlib.asynccontextmanager
async def fresh_backends() -> AsyncIterator[tuple[str, str]]:
    """A migrated database and a virtual host of their own; both removed afterwards."""
    name = f"oa_bench_{uuid.uuid4().hex[:10]}"
    vhost = f"oa-bench-{uuid.uuid4().hex[:10]}"
    database_url = f"{SERVER}/{name}"
    await migrate(database_url)
    await _rabbitmqctl("add_vhost", vhost)
    await _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield database_url, f"{AMQP}/{quote(vhost, safe='')}"
    finally:
        await _rabbitmqctl("delete_vhost", vhost)
        conn = await asyncpg.connect(f"{SERVER}/postgres")
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


async def _rabbitmqctl(*args: str) -> None:
    process = await asyncio.create_subprocess_exec("rabbitmqctl", "-q", *args)
    if await process.wait() != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed")


# --- the dequeuer alone -------------------------------------------------------------------


async def bench_settle(runs: int) -> None:
    async with fresh_backends() as (database_url, amqp_url):
        settings = Settings(database_url=database_url, amqp_url=amqp_url, metrics_port=0)
        pool = await create_pool(database_url, min_size=2, max_size=10)
        broker = await Broker.connect(amqp_url)
        stand_in = GitHubStandIn()
        await stand_in.start()
        github = GitHub.open(stand_in.url, None)
        try:
            run_ids = await _open_runs(pool, runs)
            for run_id in run_ids:
                await broker.publish(EXCHANGE_DONE, ROUTE_DONE, Done(
                    run_id=run_id, worker="bench", status="success",
                    outputs={"out.csv": f"runs/{run_id}/out.csv"},
                    state={"feature count": 2, "process time": 0.2},
                ))
            consumer = await Broker.connect(amqp_url, prefetch=PREFETCH)
            dequeuer = Dequeuer(settings, pool, consumer, github)
            started = time.perf_counter()
            task = asyncio.create_task(dequeuer.run(probes=False))
            while await pool.fetchval("SELECT count(*) FROM runs WHERE status IS NULL"):
                await asyncio.sleep(0.1)
            elapsed = time.perf_counter() - started
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await consumer.close()
            jobs = await pool.fetchval("SELECT count(*) FROM jobs WHERE status = 'success'")
            print(f"settle: {runs} runs ({jobs} jobs) settled in {elapsed:.2f} s: "
                  f"{runs / elapsed:,.0f} runs/s")
        finally:
            await github.close()
            await stand_in.stop()
            await broker.close()
            await pool.close()


async def _open_runs(pool: asyncpg.Pool, runs: int) -> list[int]:
    run_ids: list[int] = []
    async with pool.acquire() as conn:
        for start in range(0, runs, 10):
            job_id = await conn.fetchval(
                "INSERT INTO jobs (delivery_id, event, repo, sha, ref) VALUES ($1, 'push', $2,"
                " $3, 'refs/heads/main') RETURNING id", uuid.uuid4().hex, REPO, "d" * 40)
            rows = await conn.fetch(
                """
                INSERT INTO runs (job_id, source_path, layer, entry_name, queued_at, lease_until)
                SELECT $1, 'sources/bench/' || n || '.json', 'addresses', 'city', now(),
                       now() + interval '1 hour'
                FROM generate_series(1, $2) AS n RETURNING id
                """,
                job_id, min(10, runs - start),
            )
            run_ids.extend(row["id"] for row in rows)
    return run_ids


# --- the whole pipeline ---------------------------------------------------------------------


class TimedGitHub(GitHubStandIn):
    """The GitHub stand-in, noting when each commit's first and final statuses arrive."""

    def __init__(self) -> None:
        super().__init__()
        self.pending_at: dict[str, float] = {}
        self.final_at: dict[str, float] = {}
        self.final_seen = asyncio.Event()

    async def _status(self, request: web.Request) -> web.Response:
        response = await super()._status(request)
        posted = self.statuses[-1] if self.statuses else None
        if response.status == 201 and posted is not None:
            if posted.state == "pending":
                self.pending_at.setdefault(posted.sha, time.perf_counter())
            else:
                self.final_at[posted.sha] = time.perf_counter()
                self.final_seen.set()
        return response


async def bench_pipeline(runs: int, rate: float, workers: int) -> None:
    async with fresh_backends() as (database_url, amqp_url):
        github = TimedGitHub()
        await github.start()
        data = web.Application()

        async def rows(_request: web.Request) -> web.Response:
            return web.Response(body=CSV)

        data.router.add_get("/rows.csv", rows)
        data_runner = web.AppRunner(data, access_log=None)
        await data_runner.setup()
        site = web.TCPSite(data_runner, "127.0.0.1", 0)
        await site.start()
        data_url = f"http://127.0.0.1:{data_runner.addresses[0][1]}/rows.csv"
        with tempfile.TemporaryDirectory(prefix="oa-bench-") as tmp:
            port = _free_port()
            env = {
                **{k: v for k, v in os.environ.items() if k.upper() not in _SETTING_NAMES},
                "DATABASE_URL": database_url, "AMQP_URL": amqp_url,
                "STORAGE_URL": Path(tmp, "storage").as_uri(), "GITHUB_API_URL": github.url,
                "WEBHOOK_SECRETS": SECRET, "ALLOW_PRIVATE_URLS": "true", "HTTP_PORT": str(port),
                "METRICS_PORT": "0", "LOG_LEVEL": "warning", "LOG_FORMAT": "json",
            }
            names = ["webhook", "dequeuer", *(["worker"] * workers)]
            processes = [
                await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "services", name,
                    env={**env, "WORK_DIR": str(Path(tmp, f"work-{index}"))},
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                )
                for index, name in enumerate(names)
            ]
            try:
                base = f"http://127.0.0.1:{port}"
                await _wait_ready(base)
                await asyncio.sleep(3)  # workers subscribed, zygotes warm
                sent = await _push_all(github, base, data_url, runs, rate)
                deadline = time.perf_counter() + 120
                while len(github.final_at) < runs and time.perf_counter() < deadline:
                    github.final_seen.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(github.final_seen.wait(), 5)
                await _report(database_url, github, sent, runs, rate, workers)
                _report_cpu(dict(zip([f"{n}-{i}" for i, n in enumerate(names)],
                                     [p.pid for p in processes], strict=True)), runs)
            finally:
                await stop_processes(processes)
        await github.stop()
        await data_runner.cleanup()


_SETTING_NAMES = {name.upper() for name in Settings.model_fields}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_ready(base: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{base}/health/ready") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError("the webhook never became ready")


async def _push_all(
    github: TimedGitHub, base: str, data_url: str, runs: int, rate: float
) -> dict[str, float]:
    sent: dict[str, float] = {}
    source = json.dumps({
        "schema": 2, "coverage": {"country": "us", "state": "ks"},
        "layers": {"addresses": [{
            "name": "city", "data": data_url, "protocol": "http",
            "conform": {"format": "csv", "lon": "lon", "lat": "lat", "number": "number",
                        "street": "street"}}]},
    }).encode()
    pushes: list[asyncio.Task[object]] = []
    started = time.perf_counter()
    for index in range(runs):
        sha = uuid.uuid4().hex + uuid.uuid4().hex[:8]
        path = f"sources/bench/s{index}.json"
        github.add_file(REPO, path, sha, source)
        # Arrivals on a fixed clock, not after the previous answer: an open system.
        await asyncio.sleep(max(0.0, started + index / rate - time.perf_counter()))
        sent[sha] = time.perf_counter()
        pushes.append(asyncio.create_task(
            deliver(base, "push", push_payload(REPO, sha, [path]), SECRET)))
    await asyncio.gather(*pushes)
    return sent


async def _report(database_url: str, github: TimedGitHub, sent: dict[str, float], runs: int,
                  rate: float, workers: int) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT j.sha, r.status, (r.state::jsonb ->> 'process time')::float AS process_s "
            "FROM runs r JOIN jobs j ON j.id = r.job_id")
    finally:
        await conn.close()
    process_s = {row["sha"]: row["process_s"] or 0.0 for row in rows}
    statuses = [row["status"] for row in rows]
    latencies = sorted(github.final_at[sha] - sent[sha] for sha in sent if sha in github.final_at)
    own = sorted(github.final_at[sha] - sent[sha] - process_s.get(sha, 0.0)
                 for sha in sent if sha in github.final_at)
    print(f"pipeline: {runs} pushes at {rate:g}/s, {workers} workers; "
          f"{len(latencies)} final statuses; runs {statuses.count('success')} succeeded")

    def line(name: str, values: list[float]) -> str:
        if not values:
            return f"  {name}: none"
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
        return (f"  {name}: p50 {statistics.median(values) * 1000:,.0f} ms, "
                f"p99 {p99 * 1000:,.0f} ms, max {values[-1] * 1000:,.0f} ms")

    if github.final_at:
        span_s = max(github.final_at.values()) - min(sent.values())
        print(f"  throughput: {len(github.final_at)} final statuses in {span_s:.1f} s "
              f"({len(github.final_at) / span_s:.2f} runs/s)")
    print(line("push -> final status", latencies))
    print(line("pipeline's own cost (minus process time)", own))
    print(line("run process time", sorted(process_s.values())))


async def stop_processes(processes: list[asyncio.subprocess.Process]) -> None:
    """SIGTERM to each, then up to 30 s for each to exit before SIGKILL."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
    for process in processes:
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()


# --- the webhook's door ---------------------------------------------------------------------


async def bench_hooks(deliveries: int, sources: int) -> None:
    """``deliveries`` pull requests of ``sources`` changed sources each, all in flight at once:
    the time to answer ``POST /hook``, and from the post to the ``pending`` status."""
    async with fresh_backends() as (database_url, amqp_url):
        github = TimedGitHub()
        await github.start()
        source = json.dumps({
            "schema": 2, "coverage": {"country": "us", "state": "ks"},
            "layers": {"addresses": [{
                "name": "city", "data": "http://127.0.0.1:9/rows.csv", "protocol": "http",
                "conform": {"format": "csv", "lon": "lon", "lat": "lat", "number": "number",
                            "street": "street"}}]},
        }).encode()
        bodies: list[tuple[str, bytes]] = []
        for number in range(1, deliveries + 1):
            head, base = uuid.uuid4().hex + uuid.uuid4().hex[:8], "b" * 40
            paths = [f"sources/bench/pr{number}/s{index}.json" for index in range(sources)]
            github.add_pull(REPO, number, [{"filename": path, "status": "added"}
                                           for path in paths])
            for path in paths:
                github.add_file(REPO, path, head, source)
            bodies.append((head, _pull_request_payload(number, head, base)))
        with tempfile.TemporaryDirectory(prefix="oa-bench-") as tmp:
            port = _free_port()
            env = {
                **{k: v for k, v in os.environ.items() if k.upper() not in _SETTING_NAMES},
                "DATABASE_URL": database_url, "AMQP_URL": amqp_url,
                "STORAGE_URL": Path(tmp, "storage").as_uri(), "GITHUB_API_URL": github.url,
                "WEBHOOK_SECRETS": SECRET, "HTTP_PORT": str(port), "METRICS_PORT": "0",
                "LOG_LEVEL": "warning", "LOG_FORMAT": "json",
            }
            webhook = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services", "webhook", env=env,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )
            try:
                base_url = f"http://127.0.0.1:{port}"
                await _wait_ready(base_url)
                # A burst meets a webhook that has been up a while, not one still starting.
                await asyncio.sleep(2)
                answered: list[float] = []
                sent: dict[str, float] = {}
                async with aiohttp.ClientSession() as session:

                    async def post(sha: str, body: bytes) -> None:
                        headers = _signed(body, "pull_request")
                        sent[sha] = time.perf_counter()
                        async with session.post(f"{base_url}/hook", data=body,
                                                headers=headers) as response:
                            await response.read()
                            assert response.status == 202, response.status
                        answered.append(time.perf_counter() - sent[sha])

                    await asyncio.gather(*(post(sha, body) for sha, body in bodies))
                deadline = time.perf_counter() + 120
                while len(github.pending_at) < deliveries and time.perf_counter() < deadline:
                    await asyncio.sleep(0.05)
                to_pending = sorted(github.pending_at[sha] - sent[sha]
                                    for sha in sent if sha in github.pending_at)
                print(f"hooks: {deliveries} pull requests of {sources} sources in flight at once;"
                      f" {len(to_pending)} pending statuses")
                print(_percentiles("POST /hook answered", sorted(answered)))
                print(_percentiles("delivery -> pending status", to_pending))
            finally:
                webhook.terminate()
                await webhook.wait()
        await github.stop()


def _pull_request_payload(number: int, head: str, base: str) -> bytes:
    owner, name = REPO.split("/")
    return json.dumps({
        "action": "opened", "number": number,
        "pull_request": {
            "number": number, "user": {"login": "contributor"},
            "head": {"ref": f"pr-{number}", "sha": head, "repo": {"full_name": REPO}},
            "base": {"ref": "main", "sha": base, "repo": {"full_name": REPO}},
        },
        "repository": {"full_name": REPO, "name": name, "owner": {"login": owner},
                       "default_branch": "main"},
    }).encode()


def _signed(body: bytes, event: str) -> dict[str, str]:
    import hashlib
    import hmac

    return {
        "Content-Type": "application/json", "X-GitHub-Event": event,
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-Hub-Signature-256": "sha256=" + hmac.new(SECRET.encode(), body,
                                                    hashlib.sha256).hexdigest(),
    }


def _percentiles(name: str, values: list[float]) -> str:
    if not values:
        return f"  {name}: none"
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    return (f"  {name}: p50 {statistics.median(values) * 1000:,.1f} ms, "
            f"p99 {p99 * 1000:,.1f} ms, max {values[-1] * 1000:,.1f} ms")


def _cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and of every process below it (alive or reaped)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime, stime, cutime, cstime are fields 14-17 of stat; after the ")" they start at 11.
    total += sum(int(value) for value in fields[11:15]) / ticks
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            total += _cpu_s(int(child))
    return total


def _report_cpu(pids: dict[str, int], runs: int) -> None:
    """Where the CPU went, per service process (its descendants included), per run."""
    parts = [f"{name} {_cpu_s(pid) / runs * 1000:.0f}" for name, pid in pids.items()]
    print("  CPU ms per run: " + ", ".join(parts))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_service", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    settle = modes.add_parser("settle", help="the dequeuer alone")
    settle.add_argument("--runs", type=int, default=5000)
    pipeline = modes.add_parser("pipeline", help="the whole system as processes")
    pipeline.add_argument("--runs", type=int, default=1000)
    pipeline.add_argument("--rate", type=float, default=3.0, help="pushes per second")
    pipeline.add_argument("--workers", type=int, default=2)
    hooks = modes.add_parser("hooks", help="the webhook's answer and the pending status")
    hooks.add_argument("--deliveries", type=int, default=50)
    hooks.add_argument("--sources", type=int, default=20)
    args = parser.parse_args(argv)
    # As a service logs in production (JSON, info): its cost is part of what is measured.
    configure_logging("json", "info", service="bench")
    if args.mode == "settle":
        asyncio.run(bench_settle(args.runs))
    elif args.mode == "hooks":
        asyncio.run(bench_hooks(args.deliveries, args.sources))
    else:
        asyncio.run(bench_pipeline(args.runs, args.rate, args.workers))


if __name__ == "__main__":
    main(sys.argv[1:])

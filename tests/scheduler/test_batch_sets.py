"""Batch sets against a GitHub stand-in serving a tree of sources, over the real PostgreSQL and
RabbitMQ: files read only when their blob changed, runs longest first, back-pressure on the
queue, pull-request tasks first, regression warnings, the set's counts, reuse, the commands."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from services.demo.github import GitHubStandIn
from services.dequeuer.recovery import Rules
from services.dequeuer.service import Dequeuer
from services.dequeuer.settle import settle_done
from services.scheduler.batch import make_set
from services.scheduler.commands import enqueue_sources
from shared.broker import Broker
from shared.config import Settings
from shared.dispatch import latest_successes
from shared.github import GitHub
from shared.messages import QUEUE_TASKS, Done, Task
from shared.sources import list_entries, load_source
from tests.e2e_support import new_sha, running_system
from tests.support.dataserver import DataServer
from tests.support.processes import ROOT, service_env

REPO = "openaddresses/openaddresses"  # SOURCES_REPOSITORY's default
FIXTURE_SOURCES = Path(__file__).parents[1] / "fixtures" / "oa-sources"
BROKEN = b"{not json"
BAD_PROTOCOL = (b'{"schema": 2, "coverage": {"country": "xx"}, '
                b'"layers": {"addresses": [{"name": "a", "protocol": "bogus"}]}}')


def simple_source(url: str, name: str = "county") -> bytes:
    return json.dumps({
        "coverage": {"country": "us", "state": "ks"}, "schema": 2,
        "layers": {"addresses": [{
            "name": name, "data": url, "protocol": "http",
            "conform": {"format": "csv", "number": "NUM", "street": "STR", "lon": "LON",
                        "lat": "LAT"},
        }]},
    }).encode()


def fixture_tree() -> dict[str, bytes]:
    """The real fixture sources under sources/, two broken files and a file that is no
    source."""
    files = {f"sources/{path.relative_to(FIXTURE_SOURCES)}": path.read_bytes()
             for path in sorted(FIXTURE_SOURCES.rglob("*.json"))}
    files["sources/xx/broken.json"] = BROKEN
    files["sources/xx/bad_protocol.json"] = BAD_PROTOCOL
    files["README.md"] = b"# not a source"
    return files


def entries_of(files: dict[str, bytes]) -> int:
    total = 0
    for path, content in files.items():
        if path.startswith("sources/") and content not in (BROKEN, BAD_PROTOCOL):
            total += len(list_entries(load_source(content, path=path)))
    return total


@pytest.fixture
async def stand_in() -> AsyncIterator[GitHubStandIn]:
    server = GitHubStandIn()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def github(stand_in: GitHubStandIn) -> AsyncIterator[GitHub]:
    client = GitHub.open(stand_in.url, "token")
    yield client
    await client.close()


async def test_a_set_has_a_run_per_entry_and_reads_only_changed_files(
    settings: Settings, db_pool: asyncpg.Pool, stand_in: GitHubStandIn, github: GitHub
) -> None:
    files = fixture_tree()
    stand_in.set_tree(REPO, "master", new_sha(), files)
    made = await make_set(db_pool, github, settings)
    assert (made.files, made.fetched) == (26, 26)  # README.md is no source
    assert made.runs == entries_of(files) + 2 == 38
    assert stand_in.blob_reads == 26
    runs = await db_pool.fetch("SELECT * FROM runs WHERE set_id = $1", made.set_id)
    failed = {r["source_path"]: r for r in runs if r["status"] == "failure"}
    assert set(failed) == {"sources/xx/broken.json", "sources/xx/bad_protocol.json"}
    assert failed["sources/xx/broken.json"]["source_problem"] == "invalid_source"
    assert "invalid JSON" in failed["sources/xx/broken.json"]["error"]
    assert "'data' is a required property" in failed["sources/xx/bad_protocol.json"]["error"]
    assert all(r["status"] is None and r["queued_at"] is None and r["job_id"] is None
               for r in runs if r["source_path"] not in failed)
    one = next(r for r in runs if r["source_path"] == "sources/us/ks/lane_county.json")
    assert one["source"] == load_source(files["sources/us/ks/lane_county.json"])
    row = await db_pool.fetchrow("SELECT * FROM sets WHERE id = $1", made.set_id)
    assert (row["repo"], row["finished_at"], row["reuse"]) == (REPO, None, True)

    # A new head where one file changed: only that blob is read.
    files["sources/us/ks/lane_county.json"] += b"\n"
    stand_in.set_tree(REPO, "master", new_sha(), files)
    again = await make_set(db_pool, github, settings)
    assert (again.fetched, again.runs, stand_in.blob_reads) == (1, 38, 27)
    # Nothing changed: nothing read.
    stand_in.set_tree(REPO, "master", new_sha(), files)
    assert (await make_set(db_pool, github, settings)).fetched == 0
    assert stand_in.blob_reads == 27

    # --only: the files matching a glob.
    only = await make_set(db_pool, github, settings, only="sources/us/nc/*")
    paths = {r["source_path"] for r in await db_pool.fetch(
        "SELECT source_path FROM runs WHERE set_id = $1", only.set_id)}
    assert paths == {p for p in files if p.startswith("sources/us/nc/")} and len(paths) == 3


async def test_a_set_with_nothing_to_run_is_over_at_once(
    settings: Settings, db_pool: asyncpg.Pool, stand_in: GitHubStandIn, github: GitHub
) -> None:
    stand_in.set_tree(REPO, "main", new_sha(), {"sources/xx/broken.json": BROKEN})
    made = await make_set(db_pool, github, settings)
    row = await db_pool.fetchrow("SELECT * FROM sets WHERE id = $1", made.set_id)
    assert row["status"] == "done" and row["finished_at"] is not None
    assert row["counts"]["failed"] == 1 and row["counts"]["failed_by_problem"] == {
        "invalid_source": 1}
    empty = await make_set(db_pool, github, settings, only="sources/none/*")
    assert empty.runs == 0
    assert await db_pool.fetchval("SELECT counts ->> 'runs' FROM sets WHERE id = $1",
                                  empty.set_id) == "0"


async def test_runs_are_made_longest_first(
    settings: Settings, db_pool: asyncpg.Pool, stand_in: GitHubStandIn, github: GitHub
) -> None:
    names = ["quick", "slow", "never_run", "middling"]
    stand_in.set_tree(REPO, "main", new_sha(), {
        f"sources/us/ks/{name}.json": simple_source(f"http://127.0.0.1:9/{name}.csv")
        for name in names})
    for name, seconds in (("quick", 5), ("slow", 3600), ("middling", 300)):
        await db_pool.execute(
            """
            INSERT INTO runs (source_path, layer, entry_name, status, started_at, finished_at)
            VALUES ($1, 'addresses', 'county', 'success', now() - $2::interval, now())
            """,
            f"sources/us/ks/{name}.json", timedelta(seconds=seconds))
    made = await make_set(db_pool, github, settings)
    order = [r["source_path"] for r in await db_pool.fetch(
        "SELECT source_path FROM runs WHERE set_id = $1 ORDER BY id", made.set_id)]
    assert order == [f"sources/us/ks/{name}.json"
                     for name in ("never_run", "slow", "middling", "quick")]


def counts_state(features: int) -> dict[str, Any]:
    return {"feature count": features,
            "attribute counts": {"number": features, "street": features}}


async def test_the_queue_is_fed_under_its_depth_job_tasks_go_first_and_the_set_finishes(
    settings: Settings, db_pool: asyncpg.Pool, broker: Broker, stand_in: GitHubStandIn,
    github: GitHub,
) -> None:
    settings = settings.model_copy(update={"batch_queue_depth": 4,
                                           "github_api_url": stand_in.url})
    names = [f"town_{index:02d}" for index in range(12)]
    tree = {f"sources/us/ks/{name}.json": simple_source(f"http://127.0.0.1:9/{name}.csv")
            for name in names}
    stand_in.set_tree(REPO, "main", new_sha(), tree)
    # Earlier good runs of the same entries: town_03 had 1,000 addresses (it will come back
    # with 850: a warning); town_04's data will be unchanged (reused).
    for name, features in (("town_03", 1000), ("town_04", 100)):
        path = f"sources/us/ks/{name}.json"
        await db_pool.execute(
            """
            INSERT INTO runs (source_path, layer, entry_name, status, started_at, finished_at,
                              state, source, outputs, etag)
            VALUES ($1, 'addresses', 'county', 'success', now() - interval '1 hour',
                    now() - interval '50 minutes', $2, $3, $4, '"e"')
            """,
            path, counts_state(features), load_source(tree[path]),
            {"out.csv": "runs/999/out.csv"})
    made = await make_set(db_pool, github, settings)
    dequeuer = Dequeuer(settings, db_pool, broker, github)
    await dequeuer.hurry()
    assert await broker.queue_depth(QUEUE_TASKS) == (4, 0)
    await dequeuer.hurry()
    assert await broker.queue_depth(QUEUE_TASKS) == (4, 0), "fed past the depth"

    # A pull request's run is queued whatever the depth, and taken before the batch tasks.
    job_id = await db_pool.fetchval(
        "INSERT INTO jobs (delivery_id, event, repo, sha, ref) VALUES"
        " ('d-1', 'pull_request', 'o/r', $1, 'refs/pull/1/head') RETURNING id", new_sha())
    await db_pool.execute(
        "INSERT INTO runs (job_id, source_path, layer, entry_name, source) VALUES"
        " ($1, 'sources/us/ks/town_00.json', 'addresses', 'county', $2)",
        job_id, load_source(simple_source("http://127.0.0.1:9/pr.csv")))
    await dequeuer.hurry()
    assert await broker.queue_depth(QUEUE_TASKS) == (5, 0)
    first = await broker.get(QUEUE_TASKS)
    assert isinstance(first, Task) and first.job_id == job_id

    # Workers take the batch tasks one by one; the queue never holds more than 4 of them.
    rules = Rules.of(settings)
    depths = []
    settled = 0
    while True:
        task = await broker.get(QUEUE_TASKS, timeout_s=1.0)
        if task is None:
            break
        assert isinstance(task, Task) and task.set_id == made.set_id
        name = Path(task.source_path).stem
        if name == "town_05":
            done = Done(run_id=task.run_id, attempt=task.attempt, worker="w", status="failure",
                        source_problem="conform_failed", error="no such column NUM")
        elif name == "town_03":
            done = Done(run_id=task.run_id, attempt=task.attempt, worker="w",
                        status="success", state=counts_state(850))
        elif name == "town_04":
            assert task.previous is not None  # the earlier run, for a conditional download
            done = Done(run_id=task.run_id, attempt=task.attempt, worker="w", status="success",
                        state={**counts_state(100), "reused from": task.previous.run_id})
        else:
            done = Done(run_id=task.run_id, attempt=task.attempt, worker="w",
                        status="success", state=counts_state(10))
        assert (await settle_done(db_pool, done, rules)).set_run
        settled += 1
        await dequeuer.hurry()
        depths.append((await broker.queue_depth(QUEUE_TASKS))[0])
    assert settled == 12
    assert max(depths) <= 4 and depths[:8] == [4] * 8, depths

    row = await db_pool.fetchrow("SELECT * FROM sets WHERE id = $1", made.set_id)
    assert row["status"] == "done" and row["finished_at"] is not None
    assert row["counts"] == {"runs": 12, "succeeded": 10, "failed": 1, "skipped": 0,
                             "reused": 1, "warned": 1,
                             "failed_by_problem": {"conform_failed": 1},
                             "by_problem": {"conform_failed": 1}}
    warned = await db_pool.fetchrow(
        "SELECT * FROM runs WHERE set_id = $1 AND source_path = 'sources/us/ks/town_03.json'",
        made.set_id)
    assert warned["status"] == "success"
    assert warned["warning"] == ("fewer than the last good run: features 1,000 → 850 (-15%); "
                                 "numbers 1,000 → 850 (-15%); streets 1,000 → 850 (-15%)")
    # The entry's good data is still the run before the warning.
    latest = await latest_successes(db_pool, [("sources/us/ks/town_03.json", "addresses",
                                               "county")])
    assert latest[("sources/us/ks/town_03.json", "addresses", "county")]["state"][
        "feature count"] == 1000


async def test_a_fall_under_the_threshold_is_no_warning_and_a_job_names_its_warnings(
    settings: Settings, db_pool: asyncpg.Pool
) -> None:
    rules = Rules.of(settings.model_copy(update={"regression_threshold": 0.25}))
    job_id = await db_pool.fetchval(
        "INSERT INTO jobs (delivery_id, event, repo, sha, ref) VALUES"
        " ('d-2', 'push', 'o/r', $1, 'refs/heads/main') RETURNING id", new_sha())
    run_ids = []
    for name, before in (("a", 100), ("b", 100)):
        path = f"sources/us/ks/{name}.json"
        await db_pool.execute(
            "INSERT INTO runs (source_path, layer, entry_name, status, started_at, finished_at,"
            " state) VALUES ($1, 'addresses', 'county', 'success', now() - interval '2 hours',"
            " now() - interval '1 hour', $2)", path, counts_state(before))
        run_ids.append(await db_pool.fetchval(
            "INSERT INTO runs (job_id, source_path, layer, entry_name) VALUES"
            " ($1, $2, 'addresses', 'county') RETURNING id", job_id, path))
    # a: -20 % (under 25 %): no warning; b: streets -30 %: a warning.
    await settle_done(db_pool, Done(run_id=run_ids[0], worker="w", status="success",
                                    state=counts_state(80)), rules)
    await settle_done(db_pool, Done(run_id=run_ids[1], worker="w", status="success", state={
        "feature count": 100, "attribute counts": {"number": 100, "street": 70}}), rules)
    warnings = [r["warning"] for r in await db_pool.fetch(
        "SELECT warning FROM runs WHERE job_id = $1 ORDER BY id", job_id)]
    assert warnings == [None, "fewer than the last good run: streets 100 → 70 (-30%)"]
    description = await db_pool.fetchval(
        "SELECT description FROM statuses WHERE job_id = $1 ORDER BY id DESC LIMIT 1", job_id)
    assert "us/ks/b" in description and "fewer" in description.lower(), description


LANE_CSV = (b"NUM,STR,LON,LAT\n"
            b"12,Main St,-100.4661,38.4817\n"
            b"14,Main St,-100.4663,38.4819\n")


async def test_enqueue_sources_waits_for_the_set_and_reuses_unchanged_entries(
    settings: Settings, db_pool: asyncpg.Pool, broker: Broker, stand_in: GitHubStandIn
) -> None:
    settings = settings.model_copy(update={"github_api_url": stand_in.url})
    async with DataServer() as data:
        files = {
            f"sources/us/ks/{name}.json": simple_source(
                data.add(f"/{name}.csv", LANE_CSV, content_type="text/csv", etag=f'"{name}"'))
            for name in ("lane", "ness")}
        files["sources/xx/broken.json"] = BROKEN
        stand_in.set_tree(REPO, "main", new_sha(), files)
        async with running_system(settings):
            said: list[str] = []
            first = await asyncio.wait_for(enqueue_sources(
                settings, only=None, reuse=True, wait=True, say=said.append, poll_s=0.2), 90)
            assert said[0].startswith(f"set {first['set']}: 3 runs from 3 files")
            assert json.loads(said[-1]) == first
            assert first == {"set": first["set"], "runs": 3, "succeeded": 2, "failed": 1,
                             "skipped": 0, "reused": 0, "warned": 0,
                             "failed_by_problem": {"invalid_source": 1}}
            # The data did not change (the server answers 304): the outputs are reused.
            second = await asyncio.wait_for(enqueue_sources(
                settings, only=None, reuse=True, wait=True, say=said.append, poll_s=0.2), 90)
            assert (second["succeeded"], second["reused"]) == (2, 2)
            # --no-reuse: every entry downloaded and processed in full.
            third = await asyncio.wait_for(enqueue_sources(
                settings, only="sources/us/*", reuse=False, wait=True, say=said.append,
                poll_s=0.2), 90)
            assert (third["runs"], third["succeeded"], third["reused"]) == (2, 2, 0)
    outputs = await db_pool.fetch(
        "SELECT set_id, outputs FROM runs WHERE set_id IS NOT NULL AND status = 'success'"
        " ORDER BY id")
    assert all(row["outputs"]["out.csv"].startswith("runs/") for row in outputs)


async def _command(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_commands_print_what_they_did(
    settings: Settings, db_pool: asyncpg.Pool, stand_in: GitHubStandIn, tmp_path: Path
) -> None:
    stand_in.set_tree(REPO, "main", new_sha(), {"sources/xx/broken.json": BROKEN})
    storage = tmp_path / "storage"
    storage.mkdir()
    env = service_env({"DATABASE_URL": settings.database_url, "AMQP_URL": settings.amqp_url,
                       "GITHUB_API_URL": stand_in.url, "STORAGE_URL": storage.as_uri(),
                       "LOG_LEVEL": "warning"})
    code, out, err = await _command("enqueue-sources", "--wait", env=env)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == f"set 1: 1 runs from 1 files (1 read from {REPO})"
    assert json.loads(lines[-1]) == {"set": 1, "runs": 1, "succeeded": 0, "failed": 1,
                                     "skipped": 0, "reused": 0, "warned": 0,
                                     "failed_by_problem": {"invalid_source": 1}}
    code, out, err = await _command("clean-up", "--dry-run", env=env)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["dry_run"] is True
    # A repository GitHub does not know: one line, exit 1, no set.
    code, out, err = await _command("enqueue-sources", env={
        **env, "SOURCES_REPOSITORY": "nobody/nothing"})
    assert code == 1 and "nobody/nothing" in err and "Traceback" not in err, err
    assert await db_pool.fetchval("SELECT count(*) FROM sets") == 1
    assert os.listdir(storage) == []

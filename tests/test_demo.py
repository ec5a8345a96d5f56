"""Demo mode's stand-ins and its signed push, against the real webhook app."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer
from pydantic import SecretStr

from services.demo.demo import (
    DEMO_REPO,
    HERE,
    DemoStandIns,
    deliver,
    demo_source_paths,
    push_payload,
    start_stand_ins,
    wait_for_job,
)
from services.webhook.app import create_app
from services.webhook.keys import BROKER
from services.worker.isolation import Limits, RunRequest, run_isolated
from shared.broker import Broker
from shared.config import Settings
from shared.errors import GitHubError
from shared.github import GitHub
from shared.messages import QUEUE_TASKS
from shared.sources import list_entries, load_source

PATHS = ["sources/zz/demo/harbor_town.json", "sources/zz/demo/river_city.json"]


@pytest.fixture
async def demo() -> AsyncIterator[DemoStandIns]:
    stand_ins = await start_stand_ins()
    try:
        yield stand_ins
    finally:
        await stand_ins.stop()


@pytest.fixture
async def webhook_url(
    settings: Settings, demo: DemoStandIns, db_pool: asyncpg.Pool, broker: Broker
) -> AsyncIterator[str]:
    app_settings = settings.model_copy(update={
        "github_api_url": demo.github.url, "webhook_secrets": [SecretStr(demo.secret)],
    })
    app = create_app(app_settings)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    await app[BROKER].wait_ready(timeout_s=30)
    try:
        yield str(server.make_url("/"))
    finally:
        await server.close()


def test_demo_source_paths() -> None:
    assert demo_source_paths() == PATHS


async def test_stand_ins_serve_the_demo_sources_with_the_data_url(demo: DemoStandIns) -> None:
    assert demo.data_url.startswith("http://127.0.0.1:")
    assert len(demo.sha) == 40 and len(demo.secret) == 40
    github = GitHub.open(demo.github.url, None)
    try:
        for path in PATHS:
            text = (await github.get_contents(DEMO_REPO, path, demo.sha)).decode()
            assert "{data_url}" not in text
            source = load_source(text, path=path)  # valid against the schema
            (entry,) = source["layers"]["addresses"]
            name = Path(entry["data"]).name
            assert entry["data"] == f"{demo.data_url}/{name}"
            async with aiohttp.ClientSession() as session, session.get(entry["data"]) as got:
                assert got.status == 200
                assert await got.read() == (HERE / "data" / name).read_bytes()
        # Other commits and other files are not there, as on GitHub.
        for repo, path, ref in ((DEMO_REPO, PATHS[0], "0" * 40),
                                (DEMO_REPO, "sources/zz/demo/nope.json", demo.sha)):
            with pytest.raises(GitHubError) as caught:
                await github.get_contents(repo, path, ref)
            assert caught.value.status == 404
    finally:
        await github.close()


def test_push_payload_is_a_branch_push_adding_the_paths() -> None:
    from services.webhook.events import PushEvent

    event = PushEvent.model_validate(json.loads(push_payload(DEMO_REPO, "f" * 40, PATHS)))
    assert event.branch == "main"
    assert event.repository.full_name == DEMO_REPO
    assert event.after == "f" * 40 and not event.is_deletion
    assert event.changed_sources() == PATHS


async def test_demo_push_creates_a_job_with_two_runs(
    demo: DemoStandIns, webhook_url: str, db_pool: asyncpg.Pool, broker: Broker
) -> None:
    body = push_payload(DEMO_REPO, demo.sha, demo_source_paths())
    answer: dict[str, Any] = await deliver(webhook_url, "push", body, demo.secret)
    outcome = await wait_for_job(webhook_url, answer["delivery"])
    assert outcome["state"] == "job"
    job_id = outcome["job_id"]
    job = await db_pool.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
    assert (job["repo"], job["sha"], job["ref"], job["status"]) == (
        DEMO_REPO, demo.sha, "refs/heads/main", None)
    runs = await db_pool.fetch(
        "SELECT source_path, layer, entry_name, status, queued_at, source FROM runs "
        "WHERE job_id = $1 ORDER BY source_path", job_id)
    assert [(r["source_path"], r["layer"], r["entry_name"], r["status"]) for r in runs] == [
        (path, "addresses", "city", None) for path in PATHS]
    assert all(demo.data_url in r["source"]["layers"]["addresses"][0]["data"] for r in runs)
    for _ in range(100):  # queued right after the job's transaction
        if (await broker.queue_depth(QUEUE_TASKS))[0] == 2:
            break
        await asyncio.sleep(0.05)
    assert (await broker.queue_depth(QUEUE_TASKS))[0] == 2
    assert demo.github.states(demo.sha) == ["pending"]


async def test_deliver_with_the_wrong_secret_is_refused(
    demo: DemoStandIns, webhook_url: str, db_pool: asyncpg.Pool
) -> None:
    body = push_payload(DEMO_REPO, demo.sha, demo_source_paths())
    with pytest.raises(RuntimeError, match="HTTP 401"):
        await deliver(webhook_url, "push", body, "not-the-secret")
    assert await db_pool.fetchval("SELECT count(*) FROM jobs") == 0


async def test_demo_sources_process_with_the_worker_engine(
    demo: DemoStandIns, tmp_path: Path
) -> None:
    """Not the worker service, but its isolated run: the demo data conforms as shipped."""
    github = GitHub.open(demo.github.url, None)
    try:
        for path in PATHS:
            source = load_source(await github.get_contents(DEMO_REPO, path, demo.sha), path=path)
            (ref,) = list_entries(source)
            out = tmp_path / Path(path).stem
            state = await run_isolated(RunRequest(
                source=source, source_path=path, layer=ref.layer, entry_name=ref.name,
                outdir=str(out / "out"), workdir=str(out / "work"), allow_private=True,
            ), Limits(60, 4 * 1024**3))
            assert state.source_problem is None, state.error
            data_rows = (HERE / "data" / Path(source["layers"]["addresses"][0]["data"]).name
                         ).read_text().strip().count("\n")
            assert state.feature_count == data_rows
            assert (out / "out" / "out.csv").exists()
    finally:
        await github.close()

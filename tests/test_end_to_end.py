"""The whole path: signed push → webhook → tasks → worker → storage → done → dequeuer → status.

Real PostgreSQL and RabbitMQ, GitHub played by a real HTTP server on 127.0.0.1, the data
provider played by another.
"""

from __future__ import annotations

import csv
import io
import json

import asyncpg
import pytest
from pydantic import SecretStr

from services.demo.github import GitHubStandIn
from shared.broker import Broker
from shared.config import Settings
from tests.e2e_support import (
    REPO,
    job_of,
    new_sha,
    push_body,
    running_system,
    signed_headers,
    wait_for,
)
from tests.support.dataserver import DataServer

SECRET = "e2e-secret"
LANE_CSV = (
    b"NUM,STR,CITY,ZIP,LON,LAT\n"
    b"12,Main St,Dighton,67839,-100.4661,38.4817\n"
    b"14,Main St,Dighton,67839,-100.4663,38.4819\n"
)
TOWN_CSV = (
    b"lon,lat,number,street\n"
    b"-100.1,38.1,1,Elm St\n"
    b"-100.2,38.2,2.0,  Oak Ave \n"
    b",,3,No Coordinates Rd\n"
)


def source_json(url: str, columns: dict[str, str]) -> bytes:
    return json.dumps({
        "coverage": {"country": "us", "state": "ks"},
        "schema": 2,
        "layers": {"addresses": [{
            "name": "county", "data": url, "protocol": "http",
            "conform": {"format": "csv", **columns},
        }]},
    }).encode()


@pytest.fixture
async def github() -> GitHubStandIn:
    stand_in = GitHubStandIn()
    await stand_in.start()
    yield stand_in  # type: ignore[misc]
    await stand_in.stop()


@pytest.fixture
async def data() -> DataServer:
    async with DataServer() as server:
        yield server  # type: ignore[misc]


@pytest.fixture
def e2e_settings(settings: Settings, github: GitHubStandIn, broker: Broker) -> Settings:
    # Depending on `broker` empties every queue first: no task of an earlier test is left.
    return settings.model_copy(update={
        "github_api_url": github.url, "webhook_secrets": [_secret(SECRET)],
        "public_base_url": "http://oa.example.org",
    })


def _secret(value: str) -> SecretStr:
    return SecretStr(value)


def add_two_sources(github: GitHubStandIn, data: DataServer, sha: str) -> list[str]:
    lane = data.add("/lane.csv", LANE_CSV, content_type="text/csv")
    town = data.add("/town.csv", TOWN_CSV, content_type="text/csv")
    paths = ["sources/us/ks/lane_county.json", "sources/us/ks/town.json"]
    github.add_file(REPO, paths[0], sha, source_json(lane, {
        "number": "NUM", "street": "STR", "city": "CITY", "postcode": "ZIP",
        "lon": "LON", "lat": "LAT"}))
    github.add_file(REPO, paths[1], sha, source_json(town, {
        "number": "number", "street": "street", "lon": "lon", "lat": "lat"}))
    return paths


async def test_push_is_processed_end_to_end(
    e2e_settings: Settings, github: GitHubStandIn, data: DataServer, db_pool: asyncpg.Pool
) -> None:
    sha = new_sha()
    paths = add_two_sources(github, data, sha)
    async with running_system(e2e_settings) as system:
        body = push_body(paths, sha)
        response = await system.client.post("/hook", data=body,
                                            headers=signed_headers(body, SECRET))
        assert response.status == 202, await response.text()
        job_id = await job_of(db_pool, (await response.json())["delivery"])
        assert await db_pool.fetchval("SELECT count(*) FROM runs WHERE job_id = $1", job_id) == 2

        async def job_final() -> bool:
            status = await db_pool.fetchval("SELECT status FROM jobs WHERE id = $1", job_id)
            return status is not None and github.states(sha)[-1:] == ["success"]

        await wait_for(job_final, what="the job to finish and its status to be posted")

        job = await db_pool.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
        assert (job["repo"], job["sha"], job["ref"], job["status"]) == (
            REPO, sha, "refs/heads/master", "success")
        runs = await db_pool.fetch("SELECT * FROM runs WHERE job_id = $1 ORDER BY source_path",
                                   job_id)
        assert [(r["source_path"], r["layer"], r["entry_name"], r["status"]) for r in runs] == [
            ("sources/us/ks/lane_county.json", "addresses", "county", "success"),
            ("sources/us/ks/town.json", "addresses", "county", "success"),
        ]
        assert all(r["started_at"] and r["finished_at"] and r["worker"] for r in runs)
        assert github.states(sha) == ["pending", "success"]
        assert all(s.context == "openaddresses/hooked" for s in github.statuses)
        assert github.statuses[0].target_url == f"http://oa.example.org/jobs/{job_id}"

        lane, town = runs
        lane_csv = await system.storage.get_bytes(lane["outputs"]["out.csv"])
        assert lane["outputs"]["out.csv"] == f"runs/{lane['id']}/out.csv"
        rows = list(csv.reader(io.StringIO(lane_csv.decode())))
        assert rows[0] == ["LON", "LAT", "NUMBER", "STREET", "UNIT", "CITY", "DISTRICT",
                           "REGION", "POSTCODE", "ID", "HASH"]
        assert [r[:9] for r in rows[1:]] == [
            ["-100.4661", "38.4817", "12", "Main St", "", "Dighton", "", "", "67839"],
            ["-100.4663", "38.4819", "14", "Main St", "", "Dighton", "", "", "67839"],
        ]
        assert all(len(r[10]) == 16 for r in rows[1:])
        town_rows = list(csv.reader(io.StringIO(
            (await system.storage.get_bytes(town["outputs"]["out.csv"])).decode())))
        # "2.0" loses its ".0", the street is trimmed, the row without coordinates is dropped.
        assert [r[:4] for r in town_rows[1:]] == [["-100.1", "38.1", "1", "Elm St"],
                                                  ["-100.2", "38.2", "2", "Oak Ave"]]
        index = json.loads(await system.storage.get_bytes(lane["outputs"]["index.json"]))
        assert index["feature count"] == 2 and index["source problem"] is None

        page = await system.client.get(f"/jobs/{job_id}")
        html = await page.text()
        assert page.status == 200
        assert "sources/us/ks/lane_county.json" in html and "success" in html


async def test_bad_signature_creates_nothing(
    e2e_settings: Settings, github: GitHubStandIn, data: DataServer, db_pool: asyncpg.Pool
) -> None:
    sha = new_sha()
    paths = add_two_sources(github, data, sha)
    body = push_body(paths, sha)
    good = signed_headers(body, SECRET)
    missing = {k: v for k, v in good.items() if k != "X-Hub-Signature-256"}
    attempts = [
        (body, signed_headers(body, "wrong-secret")),
        (body, missing),
        (body, good | {"X-Hub-Signature-256": "sha1=" + "0" * 40}),
        (body.replace(b"Update sources", b"Update s0urces"), good),  # tampered body
    ]
    async with running_system(e2e_settings) as system:
        for payload, headers in attempts:
            response = await system.client.post("/hook", data=payload, headers=headers)
            assert response.status == 401
            assert "signature" in (await response.json())["error"]
    assert await db_pool.fetchval("SELECT count(*) FROM jobs") == 0
    assert await db_pool.fetchval("SELECT count(*) FROM runs") == 0
    assert github.statuses == []


async def test_redelivery_creates_no_second_job(
    e2e_settings: Settings, github: GitHubStandIn, data: DataServer, db_pool: asyncpg.Pool
) -> None:
    sha = new_sha()
    paths = add_two_sources(github, data, sha)
    async with running_system(e2e_settings) as system:
        body = push_body(paths, sha)
        headers = signed_headers(body, SECRET, delivery="delivery-1")
        first = await system.client.post("/hook", data=body, headers=headers)
        second = await system.client.post("/hook", data=body, headers=headers)
        assert first.status == 202
        assert second.status == 202
        assert (await second.json())["duplicate"] is True
        await job_of(db_pool, "delivery-1")
        third = await system.client.post("/hook", data=body, headers=headers)
        assert (await third.json())["duplicate"] is True

        async def job_final() -> bool:
            # The final status leaves through the outbox after the job's own commit, so
            # wait for both (the job row alone raced the delivery).
            finished = await db_pool.fetchval(
                "SELECT count(*) FROM jobs WHERE status IS NOT NULL"
            )
            return finished == 1 and github.states(sha)[-1:] == ["success"]

        await wait_for(job_final, what="the job to finish and its status to reach GitHub")
    assert await db_pool.fetchval("SELECT count(*) FROM jobs") == 1
    assert await db_pool.fetchval("SELECT count(*) FROM runs") == 2
    assert github.states(sha) == ["pending", "success"]


async def test_source_whose_data_is_missing_fails_its_run_and_the_job(
    e2e_settings: Settings, github: GitHubStandIn, data: DataServer, db_pool: asyncpg.Pool
) -> None:
    sha = new_sha()
    paths = add_two_sources(github, data, sha)
    github.add_file(REPO, "sources/us/ks/gone.json", sha,
                    source_json(data.url("/missing.csv"), {"number": "n", "street": "s",
                                                           "lon": "x", "lat": "y"}))
    paths.append("sources/us/ks/gone.json")
    async with running_system(e2e_settings) as system:
        body = push_body(paths, sha)
        response = await system.client.post("/hook", data=body,
                                             headers=signed_headers(body, SECRET))
        job_id = await job_of(db_pool, (await response.json())["delivery"])

        async def job_final() -> bool:
            status = await db_pool.fetchval("SELECT status FROM jobs WHERE id = $1", job_id)
            return status is not None and github.states(sha)[-1:] == ["failure"]

        await wait_for(job_final, what="the job to fail")
    gone = await db_pool.fetchrow("SELECT * FROM runs WHERE source_path = $1",
                                  "sources/us/ks/gone.json")
    assert gone["status"] == "failure"
    assert gone["source_problem"] == "download_failed"
    assert "404" in gone["error"]
    assert await db_pool.fetchval(
        "SELECT count(*) FROM runs WHERE job_id = $1 AND status = 'success'", job_id) == 2
    assert github.states(sha) == ["pending", "failure"]
    assert github.statuses[-1].description == "Failed: us/ks/gone (download_failed); 2 succeeded"


async def test_unchanged_entry_and_data_reuse_the_earlier_run(
    e2e_settings: Settings, github: GitHubStandIn, data: DataServer, db_pool: asyncpg.Pool
) -> None:
    url = data.add("/lane.csv", LANE_CSV, content_type="text/csv", etag='"v1"')
    path = "sources/us/ks/lane_county.json"
    source = source_json(url, {"number": "NUM", "street": "STR", "lon": "LON", "lat": "LAT"})
    first_sha, second_sha = new_sha(), new_sha()
    github.add_file(REPO, path, first_sha, source)
    github.add_file(REPO, path, second_sha, source)
    async with running_system(e2e_settings) as system:
        for sha in (first_sha, second_sha):
            body = push_body([path], sha)
            response = await system.client.post("/hook", data=body,
                                                headers=signed_headers(body, SECRET))
            job_id = await job_of(db_pool, (await response.json())["delivery"])

            async def job_final(job_id: int = job_id) -> bool:
                return await db_pool.fetchval(
                    "SELECT status FROM jobs WHERE id = $1", job_id) is not None

            await wait_for(job_final, what=f"job {job_id}")
        first, second = await db_pool.fetch("SELECT * FROM runs ORDER BY id")
        assert first["status"] == second["status"] == "success"
        assert second["state"]["reused from"] == first["id"]
        assert second["state"]["feature count"] == 2
        assert second["state"]["version"] == first["state"]["version"]
        assert len(first["state"]["version"]) == 8
        # The second run asked conditionally and kept the first run's outputs.
        conditional = [r for r in data.requests if r.path == "/lane.csv"][-1]
        assert conditional.headers.get("If-None-Match") == '"v1"'
        assert second["outputs"]["out.csv"] == first["outputs"]["out.csv"]
        assert second["outputs"]["index.json"] == f"runs/{second['id']}/index.json"
        assert b"12,Main St" in await system.storage.get_bytes(second["outputs"]["out.csv"])

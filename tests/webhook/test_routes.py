"""The webhook's HTTP routes over the real app: real PostgreSQL, RabbitMQ and a GitHub stand-in."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from pydantic import SecretStr

from services.demo.github import GitHubStandIn
from services.webhook.app import create_app
from services.webhook.keys import BROKER
from shared.broker import Broker
from shared.config import Settings
from shared.messages import QUEUE_TASKS
from shared.storage import LocalStorage
from tests.e2e_support import FIXTURES, REPO, new_sha, push_body, signed_headers

SECRET = "routes-secret"
GOOD_SOURCE = json.dumps({
    "coverage": {"country": "us", "state": "ks"},
    "schema": 2,
    "layers": {"addresses": [{
        "name": "county", "data": "http://127.0.0.1:9/lane.csv", "protocol": "http",
        "conform": {"format": "csv", "number": "N", "street": "S", "lon": "X", "lat": "Y"},
    }]},
}).encode()


@pytest.fixture
async def github() -> AsyncIterator[GitHubStandIn]:
    stand_in = GitHubStandIn()
    await stand_in.start()
    yield stand_in
    await stand_in.stop()


@pytest.fixture
def app_settings(settings: Settings, github: GitHubStandIn) -> Settings:
    return settings.model_copy(update={
        "github_api_url": github.url, "webhook_secrets": [SecretStr(SECRET)],
        "public_base_url": "http://oa.example.org",
    })


@pytest.fixture
async def client(
    app_settings: Settings, db_pool: asyncpg.Pool, broker: Broker
) -> AsyncIterator[TestClient[Any, Any]]:
    # db_pool and broker come first: tables truncated and queues purged before the app starts.
    app = create_app(app_settings)
    server = TestServer(app, host="127.0.0.1")
    test_client = TestClient(server)
    await test_client.start_server()
    # The app connects to RabbitMQ in the background; tests that count tasks need it there.
    await app[BROKER].wait_ready(timeout_s=30)
    try:
        yield test_client
    finally:
        await test_client.close()


async def post(client: TestClient[Any, Any], body: bytes, *, event: str = "push",
               delivery: str | None = None) -> tuple[int, dict[str, Any]]:
    response = await client.post("/hook", data=body,
                                 headers=signed_headers(body, SECRET, event=event,
                                                        delivery=delivery))
    return response.status, await response.json()


async def nothing_created(pool: asyncpg.Pool, broker: Broker, github: GitHubStandIn) -> None:
    assert await pool.fetchval("SELECT count(*) FROM jobs") == 0
    assert await pool.fetchval("SELECT count(*) FROM runs") == 0
    assert await pool.fetchval("SELECT count(*) FROM statuses") == 0
    assert (await broker.queue_depth(QUEUE_TASKS))[0] == 0
    assert github.statuses == []


async def test_ping_answers_pong(client: TestClient[Any, Any], db_pool: asyncpg.Pool,
                                 broker: Broker, github: GitHubStandIn) -> None:
    body = (FIXTURES / "github" / "ping.payload.json").read_bytes()
    status, answer = await post(client, body, event="ping")
    assert (status, answer) == (200, {"pong": True})
    await nothing_created(db_pool, broker, github)


@pytest.mark.parametrize("event", ["issues", "release", "check_run", ""])
async def test_unknown_event_is_accepted_and_ignored(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, broker: Broker,
    github: GitHubStandIn, event: str,
) -> None:
    sha = new_sha()
    github.add_file(REPO, "sources/us/ks/a.json", sha, GOOD_SOURCE)
    status, answer = await post(client, push_body(["sources/us/ks/a.json"], sha), event=event)
    assert status == 202
    assert "not handled" in answer["ignored"]
    await nothing_created(db_pool, broker, github)


@pytest.mark.parametrize(
    "body", [b"{not json", b"", b"\xff\xfe\x00garbage", b"\x80abc", b"{\"ref\": \"\xc3\x28\"}"]
)
async def test_body_that_is_not_json_is_400(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, broker: Broker,
    github: GitHubStandIn, body: bytes,
) -> None:
    status, answer = await post(client, body)
    assert status == 400
    assert "not JSON" in answer["error"]
    await nothing_created(db_pool, broker, github)


@pytest.mark.parametrize("field", ["repository", "after", "ref"])
async def test_push_missing_a_field_is_400_naming_it(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, broker: Broker,
    github: GitHubStandIn, field: str,
) -> None:
    payload = json.loads(push_body(["sources/us/ks/a.json"], new_sha()))
    del payload[field]
    status, answer = await post(client, json.dumps(payload).encode())
    assert status == 400
    assert f"push payload: {field}:" in answer["error"]
    await nothing_created(db_pool, broker, github)


@pytest.mark.parametrize("field", ["after", "before"])
@pytest.mark.parametrize("value", ["abc", "z" * 40, "a" * 40 + "/../x"])
async def test_push_with_a_malformed_sha_is_400_naming_it(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, broker: Broker,
    github: GitHubStandIn, field: str, value: str,
) -> None:
    sha = new_sha()
    github.add_file(REPO, "sources/us/ks/a.json", sha, GOOD_SOURCE)
    payload = json.loads(push_body(["sources/us/ks/a.json"], sha))
    payload[field] = value
    status, answer = await post(client, json.dumps(payload).encode())
    assert status == 400
    assert answer["error"].startswith(f"push payload: {field}:")
    await nothing_created(db_pool, broker, github)
    assert github.status_requests == []


async def test_push_that_is_json_but_not_an_object_is_400(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, broker: Broker, github: GitHubStandIn,
) -> None:
    status, answer = await post(client, b"[1, 2, 3]")
    assert status == 400
    assert answer["error"].startswith("push payload")
    await nothing_created(db_pool, broker, github)


async def test_push_without_delivery_header_is_400(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, broker: Broker, github: GitHubStandIn,
) -> None:
    body = push_body(["sources/us/ks/a.json"], new_sha())
    headers = signed_headers(body, SECRET)
    del headers["X-GitHub-Delivery"]
    response = await client.post("/hook", data=body, headers=headers)
    assert response.status == 400
    assert "X-GitHub-Delivery" in (await response.json())["error"]
    await nothing_created(db_pool, broker, github)


async def test_branch_deletion_is_ignored(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, broker: Broker, github: GitHubStandIn,
) -> None:
    payload = json.loads(push_body(["sources/us/ks/a.json"], new_sha()))
    payload.update(after="0" * 40, deleted=True)
    status, answer = await post(client, json.dumps(payload).encode())
    assert status == 202
    assert answer == {"ignored": "branch deletion"}
    await nothing_created(db_pool, broker, github)


async def test_real_tag_deletion_and_tag_push_are_ignored(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, broker: Broker, github: GitHubStandIn,
) -> None:
    body = (FIXTURES / "github" / "push.1.payload.json").read_bytes()
    status, _ = await post(client, body)
    assert status == 202

    sha = new_sha()
    github.add_file(REPO, "sources/us/ks/a.json", sha, GOOD_SOURCE)
    payload = json.loads(push_body(["sources/us/ks/a.json"], sha))
    payload["ref"] = "refs/tags/v1.0"
    status, answer = await post(client, json.dumps(payload).encode())
    assert status == 202
    assert answer == {"ignored": "refs/tags/v1.0 is not a branch"}
    await nothing_created(db_pool, broker, github)


async def outcome(pool: asyncpg.Pool, delivery: str, timeout_s: float = 30) -> asyncpg.Record:
    """The stored delivery once the webhook's processor has made something of it."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        row = await pool.fetchrow(
            "SELECT * FROM deliveries WHERE delivery_id = $1 AND processed_at IS NOT NULL",
            delivery)
        if row is not None:
            return row
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"delivery {delivery} was not processed in {timeout_s} s")
        await asyncio.sleep(0.05)


async def test_push_touching_no_source_ends_at_once_with_nothing_to_check(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, broker: Broker, github: GitHubStandIn,
) -> None:
    body = (FIXTURES / "github" / "push.with-new-branch.payload.json").read_bytes()
    status, answer = await post(client, body)
    assert status == 202 and answer["queued"] is True
    done = await outcome(db_pool, answer["delivery"])
    assert done["outcome"] == "job"
    job = await db_pool.fetchrow("SELECT * FROM jobs WHERE id = $1", done["job_id"])
    assert job["status"] == "success"
    assert await db_pool.fetchval("SELECT count(*) FROM runs") == 0
    await wait_until_posted(github, 1)
    assert [(s.state, s.description) for s in github.statuses] == [
        ("success", "Nothing to check")]
    assert (await broker.queue_depth(QUEUE_TASKS))[0] == 0


async def wait_until_posted(github: GitHubStandIn, count: int, timeout_s: float = 30) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if len(github.statuses) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{count} statuses expected, got {github.statuses}")


async def test_github_failing_on_contents_is_retried_until_it_answers(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, broker: Broker, github: GitHubStandIn,
) -> None:
    sha = new_sha()
    github.add_file(REPO, "sources/us/ks/a.json", sha, GOOD_SOURCE)
    github.fail_contents = True
    body = push_body(["sources/us/ks/a.json"], sha)
    headers = signed_headers(body, SECRET, delivery="delivery-502")
    response = await client.post("/hook", data=body, headers=headers)
    # Answered at once, whatever GitHub does afterwards.
    assert response.status == 202
    for _ in range(200):
        failed = await db_pool.fetchrow(
            "SELECT * FROM deliveries WHERE delivery_id = 'delivery-502'")
        if failed is not None and failed["last_error"]:
            break
        await asyncio.sleep(0.05)
    assert failed is not None and failed["processed_at"] is None
    assert "HTTP 500" in failed["last_error"]
    assert await db_pool.fetchval("SELECT count(*) FROM jobs") == 0
    # A redelivery meanwhile is the same delivery.
    again = await client.post("/hook", data=body, headers=headers)
    assert again.status == 202 and (await again.json())["duplicate"] is True
    assert await db_pool.fetchval("SELECT count(*) FROM deliveries") == 1

    github.fail_contents = False
    done = await outcome(db_pool, "delivery-502", timeout_s=30)
    assert done["outcome"] == "job"
    assert await db_pool.fetchval("SELECT count(*) FROM jobs WHERE delivery_id = $1",
                                  "delivery-502") == 1
    await wait_depth(broker, 1)


async def wait_depth(broker: Broker, ready: int) -> None:
    for _ in range(200):
        if (await broker.queue_depth(QUEUE_TASKS))[0] == ready:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"tasks never had {ready} ready")


async def test_good_push_creates_a_job_queues_tasks_and_posts_pending(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, broker: Broker, github: GitHubStandIn,
) -> None:
    sha = new_sha()
    paths = ["sources/us/ks/a.json", "sources/us/ks/b.json"]
    for path in paths:
        github.add_file(REPO, path, sha, GOOD_SOURCE)
    status, answer = await post(client, push_body(paths, sha))
    assert status == 202
    assert answer["status_url"] == f"http://oa.example.org/api/deliveries/{answer['delivery']}"
    done = await outcome(db_pool, answer["delivery"])
    runs = await db_pool.fetch("SELECT * FROM runs ORDER BY id")
    assert [r["source_path"] for r in runs] == paths
    await wait_depth(broker, 2)
    runs = await db_pool.fetch("SELECT * FROM runs ORDER BY id")
    assert all(r["status"] is None and r["queued_at"] is not None for r in runs)
    assert github.states(sha) == ["pending"]
    assert github.statuses[0].description == "Checking us/ks/a, us/ks/b"
    assert github.statuses[0].context == "openaddresses/hooked"
    assert github.statuses[0].target_url == f"http://oa.example.org/jobs/{done['job_id']}"
    status_of = await client.get(f"/api/deliveries/{answer['delivery']}")
    assert (await status_of.json())["job_url"] == f"http://oa.example.org/jobs/{done['job_id']}"


@pytest.mark.parametrize(
    ("content", "expected_error", "expected_problem"),
    [
        (b'{"schema": 2, "layers": {', "sources/us/ks/bad.json", "invalid_source"),
        (json.dumps({"schema": 2, "coverage": {"country": "us"}, "layers": {"addresses": [
            {"name": "x", "data": "http://example.org/a.csv", "protocol": "carrier-pigeon",
             "conform": {"format": "csv"}}]}}).encode(), "protocol", "unknown_protocol"),
        (json.dumps({"schema": 2, "coverage": {"country": "us"}, "layers": {"addresses": [
            {"name": "x", "data": "http://example.org/a.csv", "protocol": "http",
             "conform": {"format": "csv", "number": 12, "street": "s", "lon": "x",
                         "lat": "y"}}]}}).encode(),
         "layers.addresses[0].conform.number", "invalid_source"),
    ],
    ids=["bad-json", "unknown-protocol", "schema-failure"],
)
async def test_invalid_only_source_fails_its_run_and_the_job_at_once(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, broker: Broker,
    github: GitHubStandIn, content: bytes, expected_error: str, expected_problem: str,
) -> None:
    sha = new_sha()
    path = "sources/us/ks/bad.json"
    github.add_file(REPO, path, sha, content)
    status, answer = await post(client, push_body([path], sha))
    assert status == 202
    job_id = (await outcome(db_pool, answer["delivery"]))["job_id"]
    run = await db_pool.fetchrow("SELECT * FROM runs WHERE job_id = $1", job_id)
    assert run["status"] == "failure"
    assert run["source_problem"] == expected_problem
    assert expected_error in run["error"]
    assert run["finished_at"] is not None
    job = await db_pool.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
    assert job["status"] == "failure" and job["finished_at"] is not None
    await wait_until_posted(github, 2)
    assert github.states(sha) == ["pending", "failure"]
    assert github.statuses[-1].description == f"Failed: us/ks/bad ({expected_problem})"
    assert (await broker.queue_depth(QUEUE_TASKS))[0] == 0


async def test_invalid_source_next_to_a_good_one_leaves_the_job_open(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, broker: Broker, github: GitHubStandIn,
) -> None:
    sha = new_sha()
    github.add_file(REPO, "sources/us/ks/bad.json", sha, b"[not json")
    github.add_file(REPO, "sources/us/ks/good.json", sha, GOOD_SOURCE)
    status, answer = await post(
        client, push_body(["sources/us/ks/bad.json", "sources/us/ks/good.json"], sha))
    assert status == 202
    await outcome(db_pool, answer["delivery"])
    await wait_depth(broker, 1)
    rows = await db_pool.fetch("SELECT source_path, status, source_problem FROM runs ORDER BY id")
    assert [tuple(r) for r in rows] == [
        ("sources/us/ks/bad.json", "failure", "invalid_source"),
        ("sources/us/ks/good.json", None, None),
    ]
    assert await db_pool.fetchval("SELECT status FROM jobs") is None
    assert github.states(sha) == ["pending"]
    assert (await broker.queue_depth(QUEUE_TASKS))[0] == 1


async def test_health(client: TestClient[Any, Any]) -> None:
    response = await client.get("/health")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_unknown_job_is_404(client: TestClient[Any, Any]) -> None:
    assert (await client.get("/jobs/987654")).status == 404
    assert (await client.get("/api/jobs/987654")).status == 404


async def _job_with_run(pool: asyncpg.Pool, outputs: dict[str, str]) -> tuple[int, int]:
    job_id = await pool.fetchval(
        "INSERT INTO jobs (delivery_id, event, repo, sha, ref) "
        "VALUES ('d-1', 'push', $1, $2, 'refs/heads/main') RETURNING id", REPO, "a" * 40)
    run_id = await pool.fetchval(
        "INSERT INTO runs (job_id, source_path, layer, entry_name, status, outputs) "
        "VALUES ($1, 'sources/us/ks/a.json', 'addresses', 'county', 'success', $2) RETURNING id",
        job_id, outputs)
    return job_id, run_id


async def test_job_json_and_page(client: TestClient[Any, Any], db_pool: asyncpg.Pool) -> None:
    job_id, run_id = await _job_with_run(db_pool, {"out.csv": "runs/1/out.csv"})
    response = await client.get(f"/api/jobs/{job_id}")
    assert response.status == 200
    answer = await response.json()
    assert answer["job"]["id"] == job_id
    assert answer["job"]["repo"] == REPO
    assert answer["job"]["created_at"]  # datetimes are rendered as text
    assert [(r["id"], r["source_path"], r["status"], r["outputs"]) for r in answer["runs"]] == [
        (run_id, "sources/us/ks/a.json", "success", {"out.csv": "runs/1/out.csv"})
    ]
    page = await client.get(f"/jobs/{job_id}")
    assert page.status == 200
    assert page.content_type == "text/html"
    assert "sources/us/ks/a.json" in await page.text()


async def test_run_file_is_streamed_from_storage(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, app_settings: Settings,
) -> None:
    storage = LocalStorage(Path(app_settings.storage_url.removeprefix("file://")))
    content = b"LON,LAT\n" + b"-100.1,38.1\n" * 200_000  # a few MiB: several chunks
    _, run_id = await _job_with_run(db_pool, {})
    key = f"runs/{run_id}/out.csv"
    await storage.put_bytes(key, content)
    await db_pool.execute(
        "UPDATE runs SET outputs = $2 WHERE id = $1",
        run_id, {"out.csv": key, "gone.txt": f"runs/{run_id}/gone.txt"})

    response = await client.get(f"/runs/{run_id}/out.csv")
    assert response.status == 200
    assert response.content_type == "text/csv"
    assert await response.read() == content

    unknown = await client.get(f"/runs/{run_id}/nope.csv")
    assert unknown.status == 404
    # Listed in outputs but missing from storage: 404 too, not a 500.
    missing = await client.get(f"/runs/{run_id}/gone.txt")
    assert missing.status == 404
    assert (await client.get("/runs/987654/out.csv")).status == 404


async def test_probes_and_metrics(client: TestClient[Any, Any]) -> None:
    live = await client.get("/health/live")
    assert live.status == 200 and (await live.json())["status"] == "alive"
    ready = await client.get("/health/ready")
    assert ready.status == 200
    assert (await ready.json())["checks"] == {"database": "ok", "broker": "ok"}
    metrics = await client.get("/metrics")
    assert metrics.status == 200
    text = await metrics.text()
    # The requests just made are measured, by route.
    assert ('oa_http_request_duration_seconds_count{method="GET",route="/health/live",'
            'status="200"}') in text
    assert "oa_runs_in_flight" in text


async def test_deeply_nested_json_is_a_400_not_a_500(client: TestClient[Any, Any]) -> None:
    body = b"[" * 200_000 + b"]" * 200_000
    status, answer = await post(client, body)
    assert status == 400
    assert "nested too deeply" in answer["error"]


async def test_a_delivery_without_a_signature_header_is_refused_unread(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, broker: Broker, github: GitHubStandIn
) -> None:
    response = await client.post("/hook", data=b"{}", headers={"X-GitHub-Event": "push"})
    assert response.status == 401
    await nothing_created(db_pool, broker, github)


async def test_api_workers_tells_active_inactive_and_offline(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool
) -> None:
    run_id = await db_pool.fetchval(
        "INSERT INTO runs (source_path, layer, entry_name, status) VALUES "
        "('sources/a.json', 'addresses', 'x', 'success') RETURNING id")
    for name, minutes, run in (("w-live", 0, run_id), ("w-quiet", 11, None), ("w-gone", 25, None)):
        await db_pool.execute(
            "INSERT INTO workers (name, hostname, pid, state, run_id, last_seen_at) VALUES "
            "($1, 'h', 1, 'running', $2, now() - $3::interval)", name, run,
            timedelta(minutes=minutes))
    response = await client.get("/api/workers")
    assert response.status == 200
    answer = await response.json()
    assert answer["counts"] == {"active": 1, "inactive": 1, "offline": 1}
    by_name = {worker["name"]: worker for worker in answer["workers"]}
    assert {name: worker["status"] for name, worker in by_name.items()} == {
        "w-live": "active", "w-quiet": "inactive", "w-gone": "offline"}
    # Its last heartbeat named a run that has finished since: said so, with the run.
    assert by_name["w-live"]["run_finished"] is True
    assert by_name["w-live"]["source_path"] == "sources/a.json"
    assert answer["rules"]["offline_after_s"] == 1200

"""Pull requests, branch pushes and re-runs: real GitHub payloads against the real app, the real
PostgreSQL and RabbitMQ, and a GitHub stand-in serving every call the webhook makes."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from pydantic import SecretStr

from services.demo.github import GitHubStandIn
from services.webhook import deliveries
from services.webhook.app import create_app
from services.webhook.keys import BROKER
from shared.broker import Broker
from shared.config import Settings
from shared.messages import QUEUE_TASKS
from tests.e2e_support import FIXTURES, new_sha, signed_headers

SECRET = "pr-secret"
BASE_REPO = "openaddresses/openaddresses"
FORK = "contributor/openaddresses"
NUMBER = 7


def source(url: str, *entries: str, city: str = "CITY") -> bytes:
    """A source with one addresses entry per name; ``city`` changes the conform."""
    return json.dumps({
        "schema": 2, "coverage": {"country": "us", "state": "ks"},
        "layers": {"addresses": [{
            "name": name, "data": url, "protocol": "http",
            "conform": {"format": "csv", "number": "N", "street": "S", "city": city,
                        "lon": "X", "lat": "Y"},
        } for name in entries]},
    }).encode()


def source_two(url: str, city_b: str) -> bytes:
    """Two entries; only the second one's conform depends on ``city_b``."""
    data = json.loads(source(url, "one", "two"))
    data["layers"]["addresses"][1]["conform"]["city"] = city_b
    return json.dumps(data).encode()


def pr_payload(action: str, head_sha: str, base_sha: str, *, fork: bool = True,
               author: str = "contributor", updated_at: str | None = None) -> bytes:
    # GitHub's own payload of that action where we have one (opened, synchronize, reopened,
    # closed), else the opened one with the action replaced.
    variant = action if action in ("opened", "synchronize", "reopened", "closed") else "opened"
    payload: dict[str, Any] = json.loads(
        (FIXTURES / "github" / f"pull_request.{variant}.payload.json").read_text())
    payload = copy.deepcopy(payload)
    payload["action"] = action
    payload["number"] = NUMBER
    pr = payload["pull_request"]
    pr["number"] = NUMBER
    pr["user"]["login"] = author
    pr["head"]["sha"], pr["base"]["sha"] = head_sha, base_sha
    if updated_at is not None:
        pr["updated_at"] = updated_at
    pr["head"]["repo"]["full_name"] = FORK if fork else BASE_REPO
    pr["base"]["repo"]["full_name"] = BASE_REPO
    payload["repository"]["full_name"] = BASE_REPO
    return json.dumps(payload).encode()


def comment_payload(body: str, login: str, association: str, *, on_pr: bool = True) -> bytes:
    payload: dict[str, Any] = json.loads(
        (FIXTURES / "github" / "issue_comment.created.payload.json").read_text())
    payload["repository"]["full_name"] = BASE_REPO
    payload["issue"]["number"] = NUMBER
    payload["issue"]["user"]["login"] = "contributor"
    if on_pr:
        payload["issue"]["pull_request"] = {"url": "https://api.github.com/pulls/7"}
    payload["comment"].update(body=body, author_association=association)
    payload["comment"]["user"]["login"] = login
    return json.dumps(payload).encode()


@pytest.fixture
async def github() -> AsyncIterator[GitHubStandIn]:
    stand_in = GitHubStandIn()
    await stand_in.start()
    yield stand_in
    await stand_in.stop()


@contextlib.asynccontextmanager
async def webhook_with(settings: Settings, github: GitHubStandIn,
                       **updates: Any) -> AsyncIterator[TestClient[Any, Any]]:
    """The webhook on the GitHub stand-in (``updates`` over the test's settings)."""
    app = create_app(settings.model_copy(update={
        "github_api_url": github.url, "webhook_secrets": [SecretStr(SECRET)],
        "public_base_url": "http://oa.example.org", **updates,
    }))
    test_client = TestClient(TestServer(app, host="127.0.0.1"))
    await test_client.start_server()
    await app[BROKER].wait_ready(timeout_s=30)
    try:
        yield test_client
    finally:
        await test_client.close()


@pytest.fixture
async def client(
    settings: Settings, github: GitHubStandIn, db_pool: asyncpg.Pool, broker: Broker
) -> AsyncIterator[TestClient[Any, Any]]:
    async with webhook_with(settings, github) as test_client:
        yield test_client


async def deliver(client: TestClient[Any, Any], event: str, body: bytes) -> dict[str, Any]:
    response = await client.post("/hook", data=body,
                                 headers=signed_headers(body, SECRET, event=event))
    answer: dict[str, Any] = await response.json()
    answer["http_status"] = response.status
    return answer


async def processed(pool: asyncpg.Pool, delivery: str, timeout_s: float = 30) -> asyncpg.Record:
    for _ in range(int(timeout_s / 0.05)):
        row = await pool.fetchrow(
            "SELECT * FROM deliveries WHERE delivery_id = $1 AND processed_at IS NOT NULL",
            delivery)
        if row is not None:
            return row
        await asyncio.sleep(0.05)
    raise AssertionError(f"delivery {delivery} not processed")


async def until(condition: Any, what: str, timeout_s: float = 30) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if await condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def open_pull(client: TestClient[Any, Any], pool: asyncpg.Pool,
                    github: GitHubStandIn) -> str:
    """A pull request adding one source, opened and made into its job; returns its head."""
    head, base = new_sha(), new_sha()
    serve_pull(github, head, base,
               {"sources/us/ks/a.json": (None, source("http://127.0.0.1:9/a.csv", "one"))})
    opened = await deliver(client, "pull_request", pr_payload("opened", head, base))
    await processed(pool, opened["delivery"])
    return head


async def until_outbox_sent(pool: asyncpg.Pool) -> None:
    """Every status and comment queued so far has been sent."""
    async def sent() -> bool:
        return not await pool.fetchval("SELECT count(*) FROM statuses WHERE posted_at IS NULL")

    await until(sent, "the statuses and comments")


def serve_pull(github: GitHubStandIn, head: str, base: str, files: dict[str, tuple[bytes | None,
               bytes | None]], *, padding: int = 0) -> None:
    """``files``: path -> (content at the base, content at the head) for the pull request;
    ``padding`` other changed files (not sources) make the list span several pages."""
    listed = [{"filename": f"docs/page{index}.md", "status": "modified"}
              for index in range(padding)]
    for path, (before, after) in files.items():
        listed.append({"filename": path, "status": "added" if before is None else "modified"})
        if before is not None:
            github.add_file(BASE_REPO, path, base, before)
        if after is not None:
            github.add_file(FORK, path, head, after)
    github.add_pull(BASE_REPO, NUMBER, listed)
    github.set_pull_head(BASE_REPO, NUMBER, head_sha=head, head_repo=FORK, base_sha=base)


async def test_a_fork_pull_request_runs_only_the_changed_entry_and_comments_once(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, broker: Broker, github: GitHubStandIn,
) -> None:
    url = "http://127.0.0.1:9/a.csv"
    head, base = new_sha(), new_sha()
    # 250 other files first: the sources are on the third page of `pulls/7/files`.
    serve_pull(github, head, base, {
        "sources/us/ks/a.json": (source_two(url, "CITY"), source_two(url, "TOWN")),
        "sources/us/ks/b.json": (source(url, "only"), source(url, "only")),
    }, padding=250)
    answer = await deliver(client, "pull_request", pr_payload("opened", head, base))
    assert answer["http_status"] == 202
    done = await processed(db_pool, answer["delivery"])
    assert done["outcome"] == "job"
    job = await db_pool.fetchrow("SELECT * FROM jobs WHERE id = $1", done["job_id"])
    assert (job["event"], job["repo"], job["sha"], job["pr_number"], job["head_repo"],
            job["base_sha"]) == ("pull_request", BASE_REPO, head, NUMBER, FORK, base)
    runs = await db_pool.fetch("SELECT source_path, entry_name FROM runs")
    # One of two entries of a.json changed; b.json did not change at all.
    assert [tuple(r) for r in runs] == [("sources/us/ks/a.json", "two")]
    pages = [path for method, path in github.requests if path.endswith(f"/pulls/{NUMBER}/files")]
    assert len(pages) == 3
    # Read from the fork at the head, from the base repository at the base.
    assert ("GET", f"/repos/{FORK}/contents/sources/us/ks/a.json") in github.requests
    assert ("GET", f"/repos/{BASE_REPO}/contents/sources/us/ks/a.json") in github.requests

    async def comment_and_pending() -> bool:
        return bool(github.comments) and github.states(head) == ["pending"]

    await until(comment_and_pending, "the pending status and the comment")
    assert github.statuses[0].description == "Checking us/ks/a"
    assert github.statuses[0].context == "openaddresses/hooked"
    (comment_id, (repo, number, body)), = github.comments.items()
    assert (repo, number) == (BASE_REPO, NUMBER)
    assert "[us/ks/a](http://oa.example.org/runs/" in body and "| two |" in body

    # New commits where nothing changes any more: "Nothing to check", the comment edited.
    head2 = new_sha()
    serve_pull(github, head2, base, {
        "sources/us/ks/a.json": (source_two(url, "CITY"), source_two(url, "CITY")),
    })
    again = await deliver(client, "pull_request", pr_payload("synchronize", head2, base))
    await processed(db_pool, again["delivery"])

    async def nothing_posted() -> bool:
        return github.states(head2) == ["success"] and len(github.comment_requests) == 2

    await until(nothing_posted, "Nothing to check and the comment edited")
    assert github.statuses[-1].description == "Nothing to check"
    assert github.comment_requests == [("POST", comment_id), ("PATCH", comment_id)]
    assert "nothing to check" in github.comments[comment_id][2]


async def test_closed_and_labeled_pull_requests_create_nothing(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool,
) -> None:
    for action in ("closed", "labeled"):
        answer = await deliver(client, "pull_request", pr_payload(action, new_sha(), new_sha()))
        assert answer["http_status"] == 202
        assert "no new commits" in answer["ignored"]
    assert await db_pool.fetchval("SELECT count(*) FROM deliveries") == 0


async def test_who_may_ask_for_a_re_run_and_how_often(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, broker: Broker, github: GitHubStandIn,
) -> None:
    head = await open_pull(client, db_pool, github)

    stranger = await deliver(client, "issue_comment",
                             comment_payload("Re-run this, please!", "passer-by", "NONE"))
    assert stranger["http_status"] == 202 and "may not ask" in stranger["ignored"]
    chatter = await deliver(client, "issue_comment",
                            comment_payload("Looks good to me", "contributor", "NONE"))
    assert "not a request to re-run" in chatter["ignored"]
    on_issue = await deliver(client, "issue_comment", comment_payload(
        "re-run this, please", "contributor", "NONE", on_pr=False))
    assert "not a request to re-run" in on_issue["ignored"]

    # The author may (any case, anywhere in the comment): a new job with reuse off.
    author = await deliver(client, "issue_comment",
                           comment_payload("Please RE-RUN THIS, PLEASE. Thanks", "contributor",
                                           "NONE"))
    rerun = await processed(db_pool, author["delivery"])
    assert rerun["outcome"] == "job"
    job = await db_pool.fetchrow("SELECT * FROM jobs WHERE id = $1", rerun["job_id"])
    assert (job["event"], job["sha"], job["pr_number"]) == ("rerun", head, NUMBER)
    reuse = await db_pool.fetch("SELECT reuse FROM runs WHERE job_id = $1", rerun["job_id"])
    assert [row["reuse"] for row in reuse] == [False]

    # A member asks again within the minute: nothing new.
    member = await deliver(client, "issue_comment",
                           comment_payload("re-run this, please", "maintainer", "MEMBER"))
    too_soon = await processed(db_pool, member["delivery"])
    assert too_soon["outcome"] == "ignored" and "less than a minute" in too_soon["last_error"]
    assert await db_pool.fetchval("SELECT count(*) FROM jobs") == 2

    # After the minute, a member may.
    await db_pool.execute("UPDATE pull_requests SET last_rerun_at = now() - interval '2 min'")
    owner = await deliver(client, "issue_comment",
                          comment_payload("re-run this, please", "maintainer", "OWNER"))
    assert (await processed(db_pool, owner["delivery"]))["outcome"] == "job"
    assert await db_pool.fetchval("SELECT count(*) FROM jobs") == 3


@pytest.mark.parametrize("new_branch", [True, False])
async def test_a_branch_push_is_checked_against_the_default_branch_merge_base(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, github: GitHubStandIn, new_branch: bool,
) -> None:
    url = "http://127.0.0.1:9/a.csv"
    head, merge_base = new_sha(), new_sha()
    payload = json.loads((FIXTURES / "github" / "push.with-new-branch.payload.json").read_text())
    # A new branch's push has no commit before it (zeros); a later push has its last head.
    payload.update(ref="refs/heads/add-kansas", after=head,
                   before="0" * 40 if new_branch else new_sha())
    payload["repository"]["full_name"] = BASE_REPO
    payload["repository"]["default_branch"] = "master"
    # Only the last commit's files are in the payload; the branch changes two files.
    github.add_comparison(BASE_REPO, "master", head, merge_base, [
        {"filename": "sources/us/ks/a.json", "status": "added"},
        {"filename": "sources/us/ks/b.json", "status": "modified"},
        {"filename": "sources/us/ks/gone.json", "status": "removed"},
    ])
    github.add_file(BASE_REPO, "sources/us/ks/a.json", head, source(url, "one"))
    github.add_file(BASE_REPO, "sources/us/ks/b.json", head, source(url, "one", city="TOWN"))
    github.add_file(BASE_REPO, "sources/us/ks/b.json", merge_base, source(url, "one"))
    answer = await deliver(client, "push", json.dumps(payload).encode())
    done = await processed(db_pool, answer["delivery"])
    job = await db_pool.fetchrow("SELECT * FROM jobs WHERE id = $1", done["job_id"])
    assert (job["event"], job["base_sha"], job["ref"]) == ("push", merge_base,
                                                          "refs/heads/add-kansas")
    runs = await db_pool.fetch("SELECT source_path FROM runs ORDER BY source_path")
    assert [row["source_path"] for row in runs] == ["sources/us/ks/a.json",
                                                    "sources/us/ks/b.json"]


async def test_github_failing_for_a_while_or_rate_limited_delays_the_job_without_hammering(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, github: GitHubStandIn,
) -> None:
    url = "http://127.0.0.1:9/a.csv"
    head, base = new_sha(), new_sha()
    serve_pull(github, head, base, {"sources/us/ks/a.json": (None, source(url, "one"))})
    # Two 500s are absorbed by the client's own retries.
    github.fail_next(2)
    answer = await deliver(client, "pull_request", pr_payload("opened", head, base))
    assert (await processed(db_pool, answer["delivery"]))["outcome"] == "job"

    # A rate limit that resets in 12 s: one refused request, then nothing until the reset.
    head2 = new_sha()
    serve_pull(github, head2, base, {"sources/us/ks/a.json": (None, source(url, "two"))})
    github.limit_rate(12)
    seen = len(github.requests)
    limited = await deliver(client, "pull_request", pr_payload("synchronize", head2, base))
    await asyncio.sleep(6)
    row = await db_pool.fetchrow("SELECT * FROM deliveries WHERE delivery_id = $1",
                                 limited["delivery"])
    assert row["processed_at"] is None and "rate limit" in row["last_error"].lower()
    assert len(github.requests) - seen == 1, github.requests[seen:]
    done = await processed(db_pool, limited["delivery"], timeout_s=40)
    assert done["outcome"] == "job"


async def test_a_delivery_that_cannot_be_processed_ends_with_an_error_status(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, github: GitHubStandIn,
) -> None:
    head, base = new_sha(), new_sha()
    # No such pull request on GitHub: 404, which no retry changes.
    answer = await deliver(client, "pull_request", pr_payload("opened", head, base))
    done = await processed(db_pool, answer["delivery"])
    assert done["outcome"] == "error" and "404" in done["last_error"]

    async def error_posted() -> bool:
        return github.states(head) == ["error"]

    await until(error_posted, "the error status")
    assert github.statuses[-1].description.startswith("Could not check this commit")
    assert github.statuses[-1].target_url == (
        f"http://oa.example.org/api/deliveries/{answer['delivery']}")
    assert await db_pool.fetchval("SELECT count(*) FROM jobs") == 0


async def test_the_answer_does_not_wait_for_github(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, broker: Broker, github: GitHubStandIn,
) -> None:
    url = "http://127.0.0.1:9/a.csv"
    head, base = new_sha(), new_sha()
    serve_pull(github, head, base, {
        f"sources/us/ks/s{index}.json": (None, source(url, "one")) for index in range(300)})
    github.limit_rate(3)  # GitHub cannot even be asked for a few seconds
    answer = await deliver(client, "pull_request", pr_payload("opened", head, base))
    assert answer["http_status"] == 202
    stored = await db_pool.fetchrow("SELECT * FROM deliveries WHERE delivery_id = $1",
                                    answer["delivery"])
    assert stored is not None and stored["processed_at"] is None
    done = await processed(db_pool, answer["delivery"], timeout_s=60)
    assert await db_pool.fetchval("SELECT count(*) FROM runs WHERE job_id = $1",
                                  done["job_id"]) == 300

    async def all_queued() -> bool:
        return (await broker.queue_depth(QUEUE_TASKS))[0] == 300

    await until(all_queued, "the 300 tasks")


async def test_a_reopened_pull_request_is_checked_again_under_the_configured_context(
    settings: Settings, db_pool: asyncpg.Pool, broker: Broker, github: GitHubStandIn,
) -> None:
    url = "http://127.0.0.1:9/a.csv"
    head, base = new_sha(), new_sha()
    # The head drops entry "two" and leaves "one" as it was: nothing to check.
    serve_pull(github, head, base, {
        "sources/us/ks/a.json": (source(url, "one", "two"), source(url, "one"))})
    async with webhook_with(settings, github, status_context="oa/custom") as client:
        answer = await deliver(client, "pull_request", pr_payload("reopened", head, base))
        assert answer["http_status"] == 202
        done = await processed(db_pool, answer["delivery"])
        job = await db_pool.fetchrow("SELECT * FROM jobs WHERE id = $1", done["job_id"])
        assert (job["event"], job["sha"], job["pr_number"]) == ("pull_request", head, NUMBER)
        assert await db_pool.fetchval("SELECT count(*) FROM runs") == 0

        async def nothing_to_check() -> bool:
            return github.states(head) == ["success"]

        await until(nothing_to_check, "the status of the reopened pull request")
        assert (github.statuses[-1].description, github.statuses[-1].context) == (
            "Nothing to check", "oa/custom")

        # Entry "one" changes and "two" is removed: one run, for "one".
        head2 = new_sha()
        serve_pull(github, head2, base, {"sources/us/ks/a.json": (
            source(url, "one", "two"), source(url, "one", city="TOWN"))})
        again = await deliver(client, "pull_request", pr_payload("synchronize", head2, base))
        done = await processed(db_pool, again["delivery"])
        runs = await db_pool.fetch("SELECT entry_name FROM runs WHERE job_id = $1",
                                   done["job_id"])
        assert [row["entry_name"] for row in runs] == ["one"]

        async def pending() -> bool:
            return github.states(head2) == ["pending"]

        await until(pending, "the pending status")
        assert github.statuses[-1].context == "oa/custom"


async def test_a_re_run_that_met_a_github_failure_is_made_when_tried_again(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, github: GitHubStandIn,
) -> None:
    head = await open_pull(client, db_pool, github)
    await until_outbox_sent(db_pool)  # the first job's status and comment
    # GitHub fails every try of the re-run's first attempt (the client's own three).
    github.fail_next(3)
    asked = await deliver(client, "issue_comment",
                          comment_payload("re-run this, please", "contributor", "NONE"))
    rerun = await processed(db_pool, asked["delivery"], timeout_s=40)
    assert rerun["outcome"] == "job", rerun["last_error"]
    assert rerun["attempts"] == 2
    job = await db_pool.fetchrow("SELECT * FROM jobs WHERE id = $1", rerun["job_id"])
    assert (job["event"], job["sha"]) == ("rerun", head)


async def test_a_re_run_that_cannot_be_made_gets_an_error_status_on_the_head(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, github: GitHubStandIn,
) -> None:
    head = await open_pull(client, db_pool, github)
    del github.pulls[(BASE_REPO, NUMBER)]  # GitHub no longer knows it: 404
    asked = await deliver(client, "issue_comment",
                          comment_payload("re-run this, please", "contributor", "NONE"))
    done = await processed(db_pool, asked["delivery"])
    assert done["outcome"] == "error"

    async def error_posted() -> bool:
        return "error" in github.states(head)

    await until(error_posted, "the error status")
    assert github.statuses[-1].description == (
        f"Could not check this commit: GitHub answered HTTP 404 to pulls/{NUMBER}/files")


async def test_a_delivery_github_keeps_failing_gives_up_with_the_reason_first(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, github: GitHubStandIn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(deliveries, "MAX_ATTEMPTS", 2)
    head, base = new_sha(), new_sha()
    serve_pull(github, head, base, {"sources/us/ks/a.json": (None, source("http://x/", "a"))})
    github.fail_next(6)  # both attempts, three tries each; then the status goes through
    answer = await deliver(client, "pull_request", pr_payload("opened", head, base))
    done = await processed(db_pool, answer["delivery"], timeout_s=40)
    assert done["outcome"] == "error" and done["attempts"] == 2
    assert done["last_error"].startswith(f"GET {github.url}/repos/{BASE_REPO}/pulls/")

    async def error_posted() -> bool:
        return github.states(head) == ["error"]

    await until(error_posted, "the error status")
    description = github.statuses[-1].description
    assert description == (
        f"Could not check this commit: GitHub answered HTTP 500 to pulls/{NUMBER}/files")
    assert await db_pool.fetchval("SELECT count(*) FROM jobs") == 0


async def test_a_late_delivery_of_an_older_head_does_not_take_the_pull_request_back(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, github: GitHubStandIn,
) -> None:
    url = "http://127.0.0.1:9/a.csv"
    base, old_head, new_head = new_sha(), new_sha(), new_sha()
    serve_pull(github, old_head, base, {"sources/us/ks/a.json": (None, source(url, "one"))})
    github.add_file(FORK, "sources/us/ks/a.json", new_head, source(url, "one", city="TOWN"))
    # The newer push's delivery comes first; the older one's after it (sent again by hand
    # after it had failed, or simply out of order: GitHub does not promise order).
    newer = await deliver(client, "pull_request", pr_payload(
        "synchronize", new_head, base, updated_at="2026-12-04T10:00:05Z"))
    newer_job = (await processed(db_pool, newer["delivery"]))["job_id"]
    older = await deliver(client, "pull_request", pr_payload(
        "synchronize", old_head, base, updated_at="2026-12-04T10:00:01Z"))
    older_job = (await processed(db_pool, older["delivery"]))["job_id"]
    assert older_job > newer_job  # made later, of the older commit
    assert await db_pool.fetchval("SELECT head_sha FROM pull_requests") == new_head

    await until_outbox_sent(db_pool)
    (body,) = [found[2] for found in github.comments.values()]
    assert f"`{new_head[:7]}` · [job {newer_job}]" in body

    # A later push moves the head on.
    later = await deliver(client, "pull_request", pr_payload(
        "synchronize", old_head, base, updated_at="2026-12-04T10:01:00Z"))
    await processed(db_pool, later["delivery"])
    assert await db_pool.fetchval("SELECT head_sha FROM pull_requests") == old_head


async def test_a_branch_changing_more_files_than_compare_lists_is_read_from_its_trees(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, github: GitHubStandIn,
) -> None:
    url = "http://127.0.0.1:9/a.csv"
    head, merge_base = new_sha(), new_sha()
    payload = json.loads((FIXTURES / "github" / "push.with-new-branch.payload.json").read_text())
    payload.update(ref="refs/heads/big", after=head, before=new_sha())
    payload["repository"]["full_name"] = BASE_REPO
    payload["repository"]["default_branch"] = "master"
    docs = {f"docs/page{index}.md": f"page {index}".encode() for index in range(400)}
    # GitHub lists 300 of the comparison's files, none of them a source.
    github.add_comparison(BASE_REPO, "master", head, merge_base, [
        {"filename": path, "status": "added"} for path in list(docs)[:300]])
    # a.json changes, b.json does not, gone.json goes, c.json is new and old.json is renamed
    # (its content unchanged: nothing to check in it).
    before = {"sources/us/ks/a.json": source(url, "one"), "sources/us/ks/b.json": source(url, "b"),
              "sources/us/ks/gone.json": source(url, "g"),
              "sources/us/ks/old.json": source(url, "o")}
    after = {**docs, "sources/us/ks/a.json": source(url, "one", city="TOWN"),
             "sources/us/ks/b.json": source(url, "b"), "sources/us/ks/c.json": source(url, "c"),
             "sources/us/ks/renamed.json": source(url, "o")}
    github.add_file(BASE_REPO, "sources/us/ks/renamed.json", head,
                    after["sources/us/ks/renamed.json"])
    github.add_file(BASE_REPO, "sources/us/ks/old.json", merge_base,
                    before["sources/us/ks/old.json"])
    github.add_commit_tree(BASE_REPO, merge_base, before)
    github.add_commit_tree(BASE_REPO, head, after)
    for path in ("sources/us/ks/a.json", "sources/us/ks/c.json"):
        github.add_file(BASE_REPO, path, head, after[path])
    github.add_file(BASE_REPO, "sources/us/ks/a.json", merge_base, before["sources/us/ks/a.json"])
    answer = await deliver(client, "push", json.dumps(payload).encode())
    done = await processed(db_pool, answer["delivery"])
    assert done["outcome"] == "job", done["last_error"]
    runs = await db_pool.fetch("SELECT source_path, entry_name FROM runs ORDER BY source_path")
    assert [tuple(row) for row in runs] == [("sources/us/ks/a.json", "one"),
                                             ("sources/us/ks/c.json", "c")]
    reads = {path for method, path in github.requests if "/contents/" in path}
    assert f"/repos/{BASE_REPO}/contents/sources/us/ks/old.json" in reads


async def test_a_re_run_checks_the_head_github_has_now_also_of_a_pull_request_never_seen(
    client: TestClient[Any, Any], db_pool: asyncpg.Pool, github: GitHubStandIn,
) -> None:
    url = "http://127.0.0.1:9/a.csv"
    base, head = new_sha(), new_sha()
    # The pull request's own deliveries never reached us (the webhook was down: GitHub does
    # not send them again); its author asks for a re-run.
    serve_pull(github, head, base, {"sources/us/ks/a.json": (None, source(url, "one"))})
    asked = await deliver(client, "issue_comment",
                          comment_payload("re-run this, please", "contributor", "NONE"))
    done = await processed(db_pool, asked["delivery"])
    assert done["outcome"] == "job", done["last_error"]
    job = await db_pool.fetchrow("SELECT * FROM jobs WHERE id = $1", done["job_id"])
    assert (job["event"], job["sha"], job["head_repo"], job["base_sha"]) == (
        "rerun", head, FORK, base)
    assert ("GET", f"/repos/{BASE_REPO}/pulls/{NUMBER}") in github.requests

    # A push whose synchronize never came: the re-run takes the head GitHub has now.
    await db_pool.execute("UPDATE pull_requests SET last_rerun_at = now() - interval '2 min'")
    newer = new_sha()
    serve_pull(github, newer, base, {"sources/us/ks/a.json": (None, source(url, "two"))})
    again = await deliver(client, "issue_comment",
                          comment_payload("re-run this, please", "maintainer", "MEMBER"))
    done = await processed(db_pool, again["delivery"])
    assert await db_pool.fetchval("SELECT sha FROM jobs WHERE id = $1", done["job_id"]) == newer
    assert await db_pool.fetchval("SELECT head_sha FROM pull_requests") == newer

    # Closed since: nothing to re-run.
    await db_pool.execute("UPDATE pull_requests SET last_rerun_at = now() - interval '2 min'")
    github.set_pull_head(BASE_REPO, NUMBER, head_sha=newer, head_repo=FORK, base_sha=base,
                         state="closed")
    closed = await deliver(client, "issue_comment",
                           comment_payload("re-run this, please", "contributor", "NONE"))
    ignored = await processed(db_pool, closed["delivery"])
    assert ignored["outcome"] == "ignored" and "closed" in ignored["last_error"]
    assert await db_pool.fetchval("SELECT count(*) FROM jobs") == 2

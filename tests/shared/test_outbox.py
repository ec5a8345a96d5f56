"""The GitHub outbox (shared.outbox.send_statuses) against a real GitHub stand-in."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import asyncpg
import pytest
from structlog.testing import capture_logs

from services.demo.github import Answer, GitHubStandIn
from shared.github import GitHub
from shared.jobs import queue_comment, queue_status
from shared.outbox import send_statuses

REPO = "openaddresses/openaddresses"
SHA_A = "a" * 40
SHA_B = "b" * 40


@pytest.fixture
async def stand_in() -> AsyncIterator[GitHubStandIn]:
    server = GitHubStandIn()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def github(stand_in: GitHubStandIn) -> AsyncIterator[GitHub]:
    client = GitHub.open(stand_in.url, None)
    yield client
    await client.close()


async def queue(pool: asyncpg.Pool, *items: tuple[str, str]) -> list[int]:
    """Queue (sha, state) statuses in order; returns their ids."""
    async with pool.acquire() as conn:
        for sha, state in items:
            await queue_status(conn, job_id=None, repo=REPO, sha=sha, state=state,  # type: ignore[arg-type]
                               description=f"{state} of {sha[:1]}",
                               target_url="http://oa.example.org/jobs/1")
    return [r["id"] for r in await pool.fetch("SELECT id FROM statuses ORDER BY id")]


def posted(stand_in: GitHubStandIn) -> list[tuple[str, str]]:
    return [(s.sha, s.state) for s in stand_in.statuses]


async def make_due(pool: asyncpg.Pool) -> None:
    await pool.execute("UPDATE statuses SET next_try_at = now() WHERE posted_at IS NULL")


async def test_statuses_are_posted_in_order(
    db_pool: asyncpg.Pool, github: GitHub, stand_in: GitHubStandIn
) -> None:
    items = [(SHA_A, "pending"), (SHA_B, "pending"), (SHA_A, "success"), (SHA_B, "failure")]
    await queue(db_pool, *items)
    assert await send_statuses(db_pool, github) == 4
    assert posted(stand_in) == items
    first = stand_in.statuses[0]
    assert (first.repo, first.description, first.target_url, first.context) == (
        REPO, "pending of a", "http://oa.example.org/jobs/1", "openaddresses/hooked")
    rows = await db_pool.fetch("SELECT posted_at, attempts, last_error FROM statuses")
    assert all(r["posted_at"] is not None and r["attempts"] == 1 and r["last_error"] is None
               for r in rows)
    # Nothing is posted twice.
    assert await send_statuses(db_pool, github) == 0
    assert len(stand_in.statuses) == 4


async def test_github_failing_leaves_statuses_queued_and_a_later_call_posts_them_in_order(
    db_pool: asyncpg.Pool, github: GitHub, stand_in: GitHubStandIn
) -> None:
    first_id, second_id = await queue(db_pool, (SHA_A, "pending"), (SHA_A, "success"))
    stand_in.fail_statuses = 1
    assert await send_statuses(db_pool, github) == 0
    assert stand_in.statuses == []
    assert stand_in.fail_statuses == 0  # GitHub was asked exactly once: the second waited
    failed = await db_pool.fetchrow(
        "SELECT *, next_try_at > now() AS later FROM statuses WHERE id = $1", first_id)
    assert failed["posted_at"] is None
    assert failed["attempts"] == 1
    assert "503" in failed["last_error"]
    assert failed["later"] is True
    waiting = await db_pool.fetchrow("SELECT * FROM statuses WHERE id = $1", second_id)
    assert (waiting["posted_at"], waiting["attempts"], waiting["last_error"]) == (None, 0, None)

    # Before its next try nothing is sent, even though GitHub is back.
    assert await send_statuses(db_pool, github) == 0
    assert stand_in.statuses == []

    await make_due(db_pool)
    assert await send_statuses(db_pool, github) == 2
    assert posted(stand_in) == [(SHA_A, "pending"), (SHA_A, "success")]
    assert await db_pool.fetchval("SELECT count(*) FROM statuses WHERE posted_at IS NULL") == 0
    assert await db_pool.fetchval("SELECT attempts FROM statuses WHERE id = $1", first_id) == 2


async def test_backoff_grows_with_each_failure(
    db_pool: asyncpg.Pool, github: GitHub, stand_in: GitHubStandIn
) -> None:
    (status_id,) = await queue(db_pool, (SHA_A, "pending"))
    waits = []
    stand_in.fail_statuses = 3
    for _ in range(3):
        await make_due(db_pool)
        assert await send_statuses(db_pool, github) == 0
        waits.append(await db_pool.fetchval(
            "SELECT extract(epoch FROM next_try_at - now()) FROM statuses WHERE id = $1",
            status_id))
    assert waits[0] < waits[1] < waits[2] <= 30 * 60
    assert await db_pool.fetchval("SELECT attempts FROM statuses") == 3
    await make_due(db_pool)
    assert await send_statuses(db_pool, github) == 1
    assert posted(stand_in) == [(SHA_A, "pending")]


async def test_failed_status_blocks_later_ones_of_its_commit_only(
    db_pool: asyncpg.Pool, github: GitHub, stand_in: GitHubStandIn
) -> None:
    await queue(db_pool, (SHA_A, "pending"), (SHA_B, "pending"), (SHA_A, "success"))
    stand_in.fail_statuses = 1  # the first request, A's pending, fails
    assert await send_statuses(db_pool, github) == 1
    assert posted(stand_in) == [(SHA_B, "pending")]
    # A's success stays queued behind A's pending, untried.
    rows = await db_pool.fetch(
        "SELECT sha, state, attempts, posted_at IS NOT NULL AS sent FROM statuses ORDER BY id")
    assert [tuple(r) for r in rows] == [
        (SHA_A, "pending", 1, False), (SHA_B, "pending", 1, True), (SHA_A, "success", 0, False)]

    # Even when only the later one is due, it waits for the earlier one.
    await db_pool.execute(
        "UPDATE statuses SET next_try_at = now() WHERE sha = $1 AND state = 'success'", SHA_A)
    assert await send_statuses(db_pool, github) == 0
    assert posted(stand_in) == [(SHA_B, "pending")]

    await make_due(db_pool)
    assert await send_statuses(db_pool, github) == 2
    assert posted(stand_in) == [(SHA_B, "pending"), (SHA_A, "pending"), (SHA_A, "success")]


async def test_two_senders_post_each_status_once_and_in_order(
    db_pool: asyncpg.Pool, github: GitHub, stand_in: GitHubStandIn
) -> None:
    items = [(sha, state) for sha in (SHA_A, SHA_B, "d" * 40) for state in ("pending", "success")]
    await queue(db_pool, *items)
    counts = await asyncio.gather(send_statuses(db_pool, github), send_statuses(db_pool, github))
    # A status one sender had locked may be left to the next call; none is ever posted twice.
    await make_due(db_pool)
    rest = await send_statuses(db_pool, github)
    assert sum(counts) + rest == len(items)
    assert sorted(posted(stand_in)) == sorted(items)
    for sha in (SHA_A, SHA_B, "d" * 40):
        assert stand_in.states(sha) == ["pending", "success"]


async def send_until_sent(pool: asyncpg.Pool, github: GitHub, *, calls: int = 10) -> int:
    """Call send_statuses (every status due) until nothing is left to send; returns the calls."""
    for call in range(1, calls + 1):
        await make_due(pool)
        await send_statuses(pool, github)
        left = await pool.fetchval(
            "SELECT count(*) FROM statuses WHERE posted_at IS NULL AND given_up_at IS NULL")
        if left == 0:
            return call
    raise AssertionError(f"statuses still unsent after {calls} calls")


async def test_github_failing_for_a_while_then_recovering_posts_everything_in_order(
    db_pool: asyncpg.Pool, github: GitHub, stand_in: GitHubStandIn
) -> None:
    await queue(db_pool, (SHA_A, "pending"), (SHA_B, "pending"), (SHA_A, "success"))
    stand_in.answer_statuses(500, 502, 500)
    await send_until_sent(db_pool, github)
    assert stand_in.states(SHA_A) == ["pending", "success"]
    assert stand_in.states(SHA_B) == ["pending"]
    # A's success was never tried while A's pending was failing.
    assert stand_in.requests_for(SHA_A, "success") == [201]
    assert sorted(r.answered for r in stand_in.status_requests) == [201, 201, 201, 500, 500, 502]
    rows = await db_pool.fetch("SELECT posted_at, given_up_at FROM statuses")
    assert all(r["posted_at"] is not None and r["given_up_at"] is None for r in rows)


async def test_permanent_answer_gives_up_the_status_and_unblocks_its_commit(
    db_pool: asyncpg.Pool, github: GitHub, stand_in: GitHubStandIn
) -> None:
    pending_id, success_id = await queue(db_pool, (SHA_A, "pending"), (SHA_A, "success"))
    stand_in.answer_statuses(500, 500, 500, 422, sha=SHA_A, state="pending")
    with capture_logs() as logs:
        await send_until_sent(db_pool, github)
    assert stand_in.requests_for(SHA_A, "pending") == [500, 500, 500, 422]
    assert stand_in.states(SHA_A) == ["success"]
    given_up = await db_pool.fetchrow("SELECT * FROM statuses WHERE id = $1", pending_id)
    assert given_up["posted_at"] is None
    assert given_up["given_up_at"] is not None
    assert given_up["attempts"] == 4
    assert "HTTP 422" in given_up["last_error"]
    assert (await db_pool.fetchval("SELECT posted_at FROM statuses WHERE id = $1", success_id)
            is not None)
    events = [e for e in logs if e["event"] == "status.given_up"]
    assert len(events) == 1
    assert (events[0]["status_id"], events[0]["repo"], events[0]["sha"]) == (
        pending_id, REPO, SHA_A)
    assert "HTTP 422" in events[0]["error"]
    assert events[0]["log_level"] == "error"

    # Never tried again, however often the outbox runs and whatever its next_try_at says.
    for _ in range(3):
        await make_due(db_pool)
        assert await send_statuses(db_pool, github) == 0
    assert stand_in.requests_for(SHA_A, "pending") == [500, 500, 500, 422]
    assert await db_pool.fetchval("SELECT attempts FROM statuses WHERE id = $1", pending_id) == 4


async def test_given_up_status_does_not_block_a_status_queued_later(
    db_pool: asyncpg.Pool, github: GitHub, stand_in: GitHubStandIn
) -> None:
    (pending_id,) = await queue(db_pool, (SHA_A, "pending"))
    stand_in.answer_statuses(404)
    assert await send_statuses(db_pool, github) == 0
    assert await db_pool.fetchval(
        "SELECT given_up_at IS NOT NULL FROM statuses WHERE id = $1", pending_id)
    await queue(db_pool, (SHA_A, "failure"))
    assert await send_statuses(db_pool, github) == 1
    assert stand_in.states(SHA_A) == ["failure"]
    assert stand_in.requests_for(SHA_A) == [404, 201]


@pytest.mark.parametrize(
    ("answer", "given_up"),
    [(400, True), (404, True), (410, True), (422, True),
     (401, False), (403, False), (408, False), (429, False), (500, False), (503, False)],
)
async def test_which_answers_are_given_up_and_which_retried(
    db_pool: asyncpg.Pool, github: GitHub, stand_in: GitHubStandIn, answer: int, given_up: bool
) -> None:
    (status_id,) = await queue(db_pool, (SHA_A, "pending"))
    stand_in.answer_statuses(answer)
    assert await send_statuses(db_pool, github) == 0
    row = await db_pool.fetchrow(
        "SELECT *, next_try_at > now() AS later FROM statuses WHERE id = $1", status_id)
    assert (row["given_up_at"] is not None) is given_up
    assert row["attempts"] == 1
    assert f"HTTP {answer}" in row["last_error"]
    if not given_up:
        assert row["later"] is True
        await make_due(db_pool)
        assert await send_statuses(db_pool, github) == 1
    assert stand_in.requests_for(SHA_A) == [answer] + ([] if given_up else [201])


async def test_github_unreachable_is_retried(db_pool: asyncpg.Pool) -> None:
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (status_id,) = await queue(db_pool, (SHA_A, "pending"))
    client = GitHub.open(f"http://127.0.0.1:{port}", None)
    try:
        assert await send_statuses(db_pool, client) == 0
    finally:
        await client.close()
    row = await db_pool.fetchrow("SELECT * FROM statuses WHERE id = $1", status_id)
    assert (row["given_up_at"], row["posted_at"], row["attempts"]) == (None, None, 1)
    assert "Connect" in row["last_error"]


@pytest.mark.parametrize(
    "bad_sha", ["abc", "a" * 39, "g" * 40, "a" * 40 + "/../x", "../" + "a" * 37])
async def test_malformed_sha_is_given_up_without_any_request(
    db_pool: asyncpg.Pool, github: GitHub, stand_in: GitHubStandIn, bad_sha: str
) -> None:
    await queue(db_pool, (bad_sha, "pending"), (bad_sha, "success"), (SHA_A, "pending"))
    assert await send_statuses(db_pool, github) == 1
    assert [(r.sha, r.state) for r in stand_in.status_requests] == [(SHA_A, "pending")]
    rows = await db_pool.fetch(
        "SELECT id, given_up_at, posted_at, attempts, last_error FROM statuses ORDER BY id")
    for row in rows[:2]:
        assert row["given_up_at"] is not None and row["posted_at"] is None
        assert row["attempts"] == 1
        assert row["last_error"] == f"not a commit SHA (40 hex characters): {bad_sha!r}"
    assert rows[2]["posted_at"] is not None
    await make_due(db_pool)
    assert await send_statuses(db_pool, github) == 0
    assert len(stand_in.status_requests) == 1


@pytest.mark.parametrize("answer", [403, 429, 503])
async def test_retry_after_is_honoured(
    db_pool: asyncpg.Pool, github: GitHub, stand_in: GitHubStandIn, answer: int
) -> None:
    (status_id,) = await queue(db_pool, (SHA_A, "pending"))
    stand_in.answer_statuses(Answer(answer, retry_after="120"))
    assert await send_statuses(db_pool, github) == 0
    wait_s = await db_pool.fetchval(
        "SELECT extract(epoch FROM next_try_at - now()) FROM statuses WHERE id = $1", status_id)
    assert 119 <= wait_s <= 120  # not the 5 s of the first backoff
    assert await db_pool.fetchval(
        "SELECT given_up_at FROM statuses WHERE id = $1", status_id) is None
    # Not before it: the next call leaves it alone.
    assert await send_statuses(db_pool, github) == 0
    assert stand_in.requests_for(SHA_A) == [answer]


async def test_retry_after_shorter_than_the_backoff_leaves_the_backoff(
    db_pool: asyncpg.Pool, github: GitHub, stand_in: GitHubStandIn
) -> None:
    (status_id,) = await queue(db_pool, (SHA_A, "pending"))
    stand_in.answer_statuses(Answer(503, retry_after="1"), Answer(503, retry_after="1"))
    waits = []
    for _ in range(2):
        await make_due(db_pool)
        assert await send_statuses(db_pool, github) == 0
        waits.append(await db_pool.fetchval(
            "SELECT extract(epoch FROM next_try_at - now()) FROM statuses WHERE id = $1",
            status_id))
    assert 4 <= waits[0] <= 5 and 9 <= waits[1] <= 10


async def test_one_jobs_statuses_are_sent_alone_when_asked(
    db_pool: asyncpg.Pool, github: GitHub, stand_in: GitHubStandIn
) -> None:
    # The webhook announces a job it just made with job_id: only that job's rows go.
    jobs = []
    async with db_pool.acquire() as conn:
        for sha in (SHA_A, SHA_B):
            job_id = await conn.fetchval(
                "INSERT INTO jobs (delivery_id, event, repo, sha, ref) VALUES"
                " ($1, 'push', $2, $3, 'refs/heads/main') RETURNING id", f"d-{sha[0]}", REPO, sha)
            await queue_status(conn, job_id=job_id, repo=REPO, sha=sha, state="pending",
                               description="checking", target_url=None)
            jobs.append(job_id)
    assert await send_statuses(db_pool, github, job_id=jobs[1]) == 1
    assert posted(stand_in) == [(SHA_B, "pending")]
    # Everything else is still sent by a call for all (the dequeuer's, the retries').
    assert await send_statuses(db_pool, github) == 1
    assert posted(stand_in) == [(SHA_B, "pending"), (SHA_A, "pending")]


async def _pr_job(conn: asyncpg.Connection, sha: str, number: int = 7) -> int:
    """A pull request's job with one finished run, and its comment asked for."""
    job_id = int(await conn.fetchval(
        "INSERT INTO jobs (delivery_id, event, repo, sha, ref, pr_number) VALUES"
        " ($1, 'pull_request', $2, $3, NULL, $4) RETURNING id", f"d-{sha[:8]}", REPO, sha,
        number))
    await conn.execute(
        "INSERT INTO runs (job_id, source_path, layer, entry_name, status, source_problem,"
        " outputs, state) VALUES ($1, 'sources/us/ks/lane.json', 'addresses', 'county',"
        " 'failure', 'download_failed', '{}'::jsonb, '{}'::jsonb)", job_id)
    await queue_comment(conn, job_id=job_id, repo=REPO, sha=sha, pr_number=number)
    return job_id


async def test_a_comment_github_refused_is_sent_again_later_and_created_once(
    db_pool: asyncpg.Pool, github: GitHub, stand_in: GitHubStandIn
) -> None:
    async with db_pool.acquire() as conn:
        await _pr_job(conn, SHA_A)
    stand_in.fail_next(1)
    assert await send_statuses(db_pool, github) == 0
    assert stand_in.comments == {}
    row = await db_pool.fetchrow("SELECT * FROM statuses WHERE kind = 'comment'")
    assert row["posted_at"] is None and "HTTP 500" in row["last_error"]
    # Not before its time: the retry waits for its back-off.
    assert await send_statuses(db_pool, github) == 0 and stand_in.comments == {}
    await make_due(db_pool)
    assert await send_statuses(db_pool, github) == 1
    (comment_id, (repo, number, body)), = stand_in.comments.items()
    assert (repo, number) == (REPO, 7) and "download_failed" in body
    # The next job's comment edits that one.
    async with db_pool.acquire() as conn:
        await _pr_job(conn, SHA_B)
    assert await send_statuses(db_pool, github) == 1
    assert stand_in.comment_requests == [("POST", comment_id), ("PATCH", comment_id)]


async def test_the_comment_shows_the_newest_job_of_the_current_head(
    db_pool: asyncpg.Pool, github: GitHub, stand_in: GitHubStandIn
) -> None:
    # B is the head; A's job (an older commit, its delivery retried late) is made after B's.
    async with db_pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO pull_requests (repo, number, head_sha, base_sha) VALUES ($1, 7, $2, $3)",
            REPO, SHA_B, "c" * 40)
        head_job = await _pr_job(conn, SHA_B)
        late_job = await _pr_job(conn, SHA_A)
    assert late_job > head_job
    await send_statuses(db_pool, github)
    (body,) = [found[2] for found in stand_in.comments.values()]
    assert f"`{SHA_B[:7]}` · [job {head_job}]" in body

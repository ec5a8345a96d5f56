"""The commit-status outbox (shared.jobs.send_statuses) against a real GitHub stand-in."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from services.demo.github import GitHubStandIn
from shared.github import GitHub
from shared.jobs import queue_status, send_statuses

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
        REPO, "pending of a", "http://oa.example.org/jobs/1", "openaddresses/machine")
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

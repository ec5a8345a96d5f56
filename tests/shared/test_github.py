"""shared.github: what is worth retrying, what a SHA is, and the client against the stand-in."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.demo.github import Answer, GitHubStandIn
from shared.errors import GitHubError, NotACommit
from shared.github import GitHub, is_permanent, is_sha

REPO = "openaddresses/openaddresses"
SHA = "0123456789abcdef0123456789abcdef01234567"


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


@pytest.mark.parametrize(
    ("status", "permanent"),
    [
        # Refused for good: the request itself is wrong or names nothing.
        (400, True), (404, True), (410, True), (422, True),
        # A bad or rate-limited token: fixed by an operator or by time.
        (401, False), (403, False),
        # Passes with time.
        (408, False), (429, False), (500, False), (502, False), (503, False), (504, False),
        # No answer at all: network error or timeout.
        (None, False),
    ],
)
def test_is_permanent(status: int | None, permanent: bool) -> None:
    assert is_permanent(GitHubError("x", status)) is permanent


def test_malformed_sha_is_permanent() -> None:
    assert is_permanent(NotACommit("not a commit SHA")) is True


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (SHA, True), (SHA.upper(), True), ("0" * 40, True),
        ("", False), (SHA[:-1], False), (SHA + "0", False), (SHA + "\n", False),
        (" " + SHA[1:], False), ("g" + SHA[1:], False), ("../" + SHA[3:], False),
        ("main", False), ("٠" * 40, False),  # Arabic-Indic zeros are digits, not hex
    ],
)
def test_is_sha(value: str, ok: bool) -> None:
    assert is_sha(value) is ok


@pytest.mark.parametrize("bad", ["main", SHA[:7], f"{SHA}/../../other", "a?b=c" + SHA[5:]])
async def test_malformed_sha_never_reaches_a_url(
    github: GitHub, stand_in: GitHubStandIn, bad: str
) -> None:
    stand_in.add_file(REPO, "sources/a.json", bad, b"{}")
    with pytest.raises(NotACommit, match="not a commit SHA"):
        await github.create_status(REPO, bad, "pending", description="d", target_url=None)
    with pytest.raises(NotACommit, match="not a commit SHA"):
        await github.get_contents(REPO, "sources/a.json", bad)
    assert stand_in.status_requests == []
    assert stand_in.statuses == []


async def test_good_sha_is_served(github: GitHub, stand_in: GitHubStandIn) -> None:
    stand_in.add_file(REPO, "sources/a.json", SHA, b"{}")
    assert await github.get_contents(REPO, "sources/a.json", SHA) == b"{}"
    await github.create_status(REPO, SHA, "pending", description="d", target_url=None)
    assert stand_in.states(SHA) == ["pending"]


@pytest.mark.parametrize(
    ("header", "expected_s"),
    [("120", 120.0), ("0", 0.0), ("1.5", 1.5), (" 7 ", 7.0), ("999999999999", 24 * 3600.0),
     ("Wed, 21 Oct 2015 07:28:00 GMT", None), ("-5", None), ("nan", None), (None, None)],
)
async def test_retry_after_is_carried_by_the_error(
    github: GitHub, stand_in: GitHubStandIn, header: str | None, expected_s: float | None
) -> None:
    stand_in.answer_statuses(Answer(429, retry_after=header))
    with pytest.raises(GitHubError) as caught:
        await github.create_status(REPO, SHA, "pending", description="d", target_url=None)
    assert caught.value.status == 429
    assert caught.value.retry_after_s == expected_s

"""The GitHub REST calls oa-machine makes, and nothing else.

Reading: a file at a commit (``contents``), a pull request's current head (``pulls/{n}``, for a
re-run asked in a comment) and changed files (``pulls/{n}/files``, paginated), a branch's
changes against another (``compare``), a commit's tree and blobs (batch sets, and branches
that change more files than ``compare`` lists). Writing: commit statuses and
the one comment per pull request (created, then edited in place).

The base URL is a setting so that tests and the demo can point it at a stand-in server. Which
GitHub errors are worth retrying is decided here, once (:func:`is_permanent`). The client is
polite: 5xx answers and lost connections are tried again a few times with a back-off; a rate
limit (``Retry-After``, or ``X-RateLimit-Remaining: 0`` with ``X-RateLimit-Reset``) is waited
out when the wait is short, and otherwise raised as a :class:`GitHubError` carrying
``retry_after_s`` so that the caller reschedules the work; until the reset no request is sent.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal
from urllib.parse import quote, unquote, urlsplit

import aiohttp

from shared.errors import GitHubError, NotACommit

#: The context the reference Machine posted, which branch protection rules may require.
STATUS_CONTEXT: Final = "openaddresses/hooked"
StatusState = Literal["pending", "success", "failure", "error"]

#: A full commit SHA. Only these go into a URL: anything else could name another resource
#: (``..``, ``?``, ``/``) and can never be a commit anyway.
SHA_PATTERN: Final = r"^[0-9a-fA-F]{40}$"
_SHA = re.compile(SHA_PATTERN)

#: Answers no retry can change: a malformed request (400), a repository or commit that is not
#: there (404) or no longer is (410), a payload GitHub refuses (422).
PERMANENT_STATUSES: Final = frozenset({400, 404, 410, 422})

#: The most files ``compare`` lists; a comparison of more is cut there, silently.
COMPARE_MAX_FILES: Final = 300
#: GitHub refuses descriptions longer than this.
_MAX_DESCRIPTION = 140
_TIMEOUT = aiohttp.ClientTimeout(total=60, connect=10)
#: Tries of one request while GitHub answers 5xx or the connection fails.
_TRIES = 3
_BACKOFF_S = 0.5
#: A rate-limit wait up to this long happens in the client; a longer one is the caller's.
_WAIT_IN_CLIENT_S = 10.0
#: Pages of a pull request's files read at most (GitHub lists 3,000 files at most).
_MAX_PAGES = 30
#: A longer ``Retry-After`` is taken as this: a typo on the other side must not park a status
#: for years (nor overflow a ``timedelta``).
_MAX_RETRY_AFTER_S = 24 * 3600.0


def _brief(url: str) -> str:
    """What a request asked for, without the API's address, the repository or the query:
    ``contents/sources/us/ca/alameda.json`` (the repository is the status's own)."""
    path = urlsplit(url).path
    parts = path.split("/")
    if "repos" in parts:
        rest = parts[parts.index("repos") + 3:]
        if rest:
            return unquote("/".join(rest))
    return unquote(path)


def github_time(value: object) -> datetime | None:
    """A time as GitHub writes it (``2019-05-15T15:20:33Z``); None when it is not one."""
    if not isinstance(value, str):
        return None
    try:
        found = datetime.fromisoformat(value)
    except ValueError:
        return None
    return found if found.tzinfo is not None else None


def is_sha(value: str) -> bool:
    """Whether ``value`` is a full commit SHA (40 hex characters)."""
    return _SHA.fullmatch(value) is not None


def check_sha(value: str) -> str:
    """``value`` if it is a full commit SHA; :class:`NotACommit` otherwise."""
    if not is_sha(value):
        raise NotACommit(f"not a commit SHA (40 hex characters): {value[:100]!r}")
    return value


def is_permanent(error: GitHubError) -> bool:
    """Whether no retry of the request that raised ``error`` can ever succeed.

    Everything else is worth retrying: 5xx, 408, 429 and no answer at all pass with time, and
    so do 401 and 403, which mean a bad, expired or rate-limited token: an operator fixes the
    token or the limit resets, and giving up would lose every status meanwhile.
    """
    return isinstance(error, NotACommit) or error.status in PERMANENT_STATUSES


class GitHub:
    """A thin client over one ``aiohttp.ClientSession``; create with :meth:`open`."""

    def __init__(self, session: aiohttp.ClientSession, api_url: str, token: str | None) -> None:
        self._session = session
        self._api_url = api_url.rstrip("/")
        self._headers = {
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28",
            "User-Agent": "oa-machine",
        }
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        #: No request before this time (epoch seconds): GitHub said the rate limit is used up.
        self._paused_until = 0.0

    @classmethod
    def open(cls, api_url: str, token: str | None) -> GitHub:
        """A client with its own session; close it with :meth:`close`."""
        return cls(aiohttp.ClientSession(timeout=_TIMEOUT), api_url, token)

    async def close(self) -> None:
        """Close the underlying HTTP session."""
        await self._session.close()

    async def get_contents(self, repo: str, path: str, ref: str) -> bytes:
        """The bytes of ``path`` in ``repo`` (``owner/name``) at commit ``ref``.

        ``ref`` must be a full commit SHA (:class:`NotACommit` otherwise): a branch could
        move between two reads of one push.
        """
        check_sha(ref)
        url = f"{self._api_url}/repos/{repo}/contents/{quote(path)}"
        body, _links = await self._request("GET", url, params={"ref": ref})
        if not isinstance(body, dict) or body.get("type") != "file":
            raise GitHubError(f"{repo}/{path}@{ref} is not a file")
        if body.get("encoding") == "base64" and isinstance(body.get("content"), str):
            try:
                return base64.b64decode(body["content"], validate=False)
            except binascii.Error as exc:
                raise GitHubError(f"{repo}/{path}@{ref}: undecodable content") from exc
        # Files over 1 MB come without inline content; their raw form is one more request away.
        raw, _links = await self._request(
            "GET", url, params={"ref": ref}, accept="application/vnd.github.raw+json", raw=True
        )
        assert isinstance(raw, bytes)
        return raw

    async def pull_request(self, repo: str, number: int) -> PullRequestHead:
        """A pull request's current head and base, as GitHub has them now."""
        url = f"{self._api_url}/repos/{repo}/pulls/{number}"
        body, _links = await self._request("GET", url)
        found = PullRequestHead.of(body)
        if found is None:
            raise GitHubError(f"GET {url}: not a pull request with a head and a base",
                              reason=f"GitHub's pulls/{number} has no head or base")
        return found

    async def pull_files(self, repo: str, number: int) -> list[ChangedFile]:
        """Every file a pull request changes, following the ``Link`` header page by page."""
        url: str | None = f"{self._api_url}/repos/{repo}/pulls/{number}/files"
        params: dict[str, str] | None = {"per_page": "100", "page": "1"}
        files: list[ChangedFile] = []
        for _ in range(_MAX_PAGES):
            if url is None:
                break
            body, links = await self._request("GET", url, params=params)
            if not isinstance(body, list):
                raise GitHubError(f"GET {url}: not a list of files")
            files.extend(ChangedFile.of(item) for item in body if isinstance(item, dict))
            # The next page's URL carries its own query.
            url, params = links.get("next"), None
        return files

    async def compare(self, repo: str, base: str, head: str) -> Comparison:
        """The files changed from the merge base of ``base`` and ``head`` to ``head``."""
        check_sha(head)
        url = f"{self._api_url}/repos/{repo}/compare/{quote(base, safe='')}...{head}"
        body, _links = await self._request("GET", url)
        if not isinstance(body, dict):
            raise GitHubError(f"GET {url}: not a comparison")
        merge_base = (body.get("merge_base_commit") or {}).get("sha")
        if not isinstance(merge_base, str) or not is_sha(merge_base):
            raise GitHubError(f"GET {url}: no merge base commit in the answer")
        files = [ChangedFile.of(item) for item in body.get("files") or [] if isinstance(item, dict)]
        return Comparison(merge_base, files)

    async def default_branch_head(self, repo: str) -> tuple[str, str]:
        """``(default branch, its head commit)`` of ``repo``."""
        body, _links = await self._request("GET", f"{self._api_url}/repos/{repo}")
        branch = body.get("default_branch") if isinstance(body, dict) else None
        if not isinstance(branch, str) or not branch:
            raise GitHubError(f"GET repos/{repo}: no default branch in the answer")
        body, _links = await self._request(
            "GET", f"{self._api_url}/repos/{repo}/branches/{quote(branch, safe='')}"
        )
        sha = ((body or {}).get("commit") or {}).get("sha") if isinstance(body, dict) else None
        if not isinstance(sha, str) or not is_sha(sha):
            raise GitHubError(f"GET repos/{repo}/branches/{branch}: no commit in the answer")
        return branch, sha

    async def tree(self, repo: str, sha: str) -> list[TreeFile]:
        """Every file (blob) of the commit ``sha``, with one recursive trees call."""
        check_sha(sha)
        body, _links = await self._request(
            "GET", f"{self._api_url}/repos/{repo}/git/trees/{sha}", params={"recursive": "1"}
        )
        if not isinstance(body, dict) or not isinstance(body.get("tree"), list):
            raise GitHubError(f"GET repos/{repo}/git/trees/{sha}: not a tree")
        if body.get("truncated"):
            # GitHub cuts recursive trees past 100,000 entries or 7 MB: a partial list would
            # silently leave sources out of the set.
            raise GitHubError(f"GET repos/{repo}/git/trees/{sha}: the tree was truncated")
        return [TreeFile(str(item["path"]), str(item["sha"])) for item in body["tree"]
                if isinstance(item, dict) and item.get("type") == "blob"
                and isinstance(item.get("path"), str) and isinstance(item.get("sha"), str)]

    async def blob(self, repo: str, sha: str) -> bytes:
        """The content of the blob ``sha``."""
        check_sha(sha)
        body, _links = await self._request("GET", f"{self._api_url}/repos/{repo}/git/blobs/{sha}")
        if not isinstance(body, dict) or not isinstance(body.get("content"), str):
            raise GitHubError(f"GET repos/{repo}/git/blobs/{sha}: no content")
        if body.get("encoding", "base64") != "base64":
            return str(body["content"]).encode()
        try:
            return base64.b64decode(body["content"], validate=False)
        except binascii.Error as exc:
            raise GitHubError(f"blob {sha} of {repo}: undecodable content") from exc

    async def create_status(
        self,
        repo: str,
        sha: str,
        state: StatusState,
        *,
        description: str,
        target_url: str | None,
        context: str = STATUS_CONTEXT,
    ) -> None:
        """Post a commit status for ``sha`` (a full SHA; :class:`NotACommit` otherwise)."""
        check_sha(sha)
        payload: dict[str, Any] = {
            "state": state,
            "description": fit_description(description),
            "context": context,
        }
        if target_url:
            payload["target_url"] = target_url
        await self._request(
            "POST", f"{self._api_url}/repos/{repo}/statuses/{sha}", json=payload, tries=1
        )

    async def create_comment(self, repo: str, number: int, body: str) -> int:
        """Comment on issue or pull request ``number``; returns the comment's id."""
        answer, _links = await self._request(
            "POST", f"{self._api_url}/repos/{repo}/issues/{number}/comments",
            json={"body": body}, tries=1,
        )
        comment_id = answer.get("id") if isinstance(answer, dict) else None
        if not isinstance(comment_id, int):
            raise GitHubError(f"comment on {repo}#{number}: no id in the answer")
        return comment_id

    async def update_comment(self, repo: str, comment_id: int, body: str) -> None:
        """Replace the text of comment ``comment_id``."""
        await self._request(
            "PATCH", f"{self._api_url}/repos/{repo}/issues/comments/{comment_id}",
            json={"body": body}, tries=1,
        )

    async def _request(
        self, method: str, url: str, *, accept: str | None = None, raw: bool = False,
        tries: int = _TRIES, **kwargs: Any,
    ) -> tuple[Any, dict[str, str]]:
        """Send one request with the retry and rate-limit policy of the module docstring.

        Returns the decoded JSON (or the bytes with ``raw``) and the ``Link`` targets by rel.
        Writes go through the outbox, which retries them in order on its own schedule: they
        are sent with ``tries=1``.
        """
        headers = dict(self._headers)
        if accept:
            headers["Accept"] = accept
        failures = 0
        while True:
            await self._wait_for_rate_limit(f"{method} {url}")
            try:
                async with self._session.request(
                    method, url, headers=headers, **kwargs
                ) as response:
                    self._note_rate_limit(response)
                    if response.status >= 400:
                        text = (await response.text())[:300]
                        error = GitHubError(
                            f"{method} {url}: HTTP {response.status}: {text}", response.status,
                            retry_after_s=self._limited_for_s(response),
                            reason=f"GitHub answered HTTP {response.status} to {_brief(url)}",
                        )
                        failures += 1
                        # 5xx and rate limits may pass; other 4xx answers will not.
                        passing = response.status >= 500 or error.retry_after_s is not None
                        wait_s = (error.retry_after_s if error.retry_after_s is not None
                                  else _BACKOFF_S * 2**failures)
                        if not passing or failures >= tries or wait_s > _WAIT_IN_CLIENT_S:
                            raise error
                        await asyncio.sleep(wait_s)
                        continue
                    links = {rel: str(link.get("url")) for rel, link in response.links.items()}
                    if raw:
                        return await response.read(), links
                    if response.status == 204:
                        return None, links
                    return await response.json(content_type=None), links
            except (aiohttp.ClientError, TimeoutError) as exc:
                failures += 1
                if failures >= tries:
                    raise GitHubError(
                        f"{method} {url}: {exc!r}",
                        reason=f"GitHub did not answer ({type(exc).__name__}) to {_brief(url)}",
                    ) from exc
                await asyncio.sleep(_BACKOFF_S * 2 ** failures)
            except ValueError as exc:
                raise GitHubError(f"{method} {url}: the answer is not JSON: {exc}") from exc

    def _note_rate_limit(self, response: aiohttp.ClientResponse) -> None:
        remaining = response.headers.get("X-RateLimit-Remaining")
        reset = response.headers.get("X-RateLimit-Reset")
        if remaining is not None and remaining.strip() == "0" and reset is not None:
            with contextlib.suppress(ValueError):
                self._paused_until = max(self._paused_until, float(reset))

    def _limited_for_s(self, response: aiohttp.ClientResponse) -> float | None:
        """How long GitHub asks us to wait, from ``Retry-After`` or the rate-limit reset."""
        after = _retry_after_s(response.headers)
        if after is not None:
            return after
        if response.status in (403, 429) and self._paused_until > time.time():
            return min(self._paused_until - time.time(), _MAX_RETRY_AFTER_S)
        return None

    async def _wait_for_rate_limit(self, what: str) -> None:
        wait_s = self._paused_until - time.time()
        if wait_s <= 0:
            return
        if wait_s > _WAIT_IN_CLIENT_S:
            raise GitHubError(
                f"{what}: not sent, the rate limit resets in {wait_s:.0f} s", 429,
                retry_after_s=min(wait_s, _MAX_RETRY_AFTER_S),
                reason=f"GitHub's rate limit, which resets in {wait_s:.0f} s",
            )
        await asyncio.sleep(wait_s)


@dataclass(frozen=True)
class ChangedFile:
    """One file of a pull request or a comparison."""

    filename: str
    #: added, removed, modified, renamed, copied, changed or unchanged.
    status: str
    previous_filename: str | None = None

    @classmethod
    def of(cls, item: Mapping[str, Any]) -> ChangedFile:
        previous = item.get("previous_filename")
        return cls(str(item.get("filename", "")), str(item.get("status", "modified")),
                   previous if isinstance(previous, str) else None)


@dataclass(frozen=True)
class TreeFile:
    """A file of a commit's tree: its path and its blob's SHA."""

    path: str
    sha: str


@dataclass(frozen=True)
class PullRequestHead:
    """What ``GET pulls/{n}`` tells of a pull request: its head (in a fork's repository, or the
    base one when the fork is gone), its base, its author and whether it is open."""

    head_sha: str
    head_repo: str | None
    base_sha: str
    base_ref: str
    author: str | None
    open: bool
    #: GitHub's time of the pull request's last change.
    updated_at: datetime | None = None

    @classmethod
    def of(cls, body: Any) -> PullRequestHead | None:
        if not isinstance(body, dict):
            return None
        head, base = body.get("head"), body.get("base")
        if not isinstance(head, dict) or not isinstance(base, dict):
            return None
        head_sha, base_sha = head.get("sha"), base.get("sha")
        if not (isinstance(head_sha, str) and is_sha(head_sha)
                and isinstance(base_sha, str) and is_sha(base_sha)):
            return None
        head_repo = (head.get("repo") or {}).get("full_name")
        author = (body.get("user") or {}).get("login")
        return cls(head_sha, head_repo if isinstance(head_repo, str) else None, base_sha,
                   str(base.get("ref") or ""), author if isinstance(author, str) else None,
                   body.get("state") == "open", github_time(body.get("updated_at")))


@dataclass(frozen=True)
class Comparison:
    """What ``compare/{base}...{head}`` tells: the merge base and the files changed since."""

    merge_base: str
    files: list[ChangedFile]

    @property
    def may_be_cut(self) -> bool:
        """GitHub lists at most 300 of a comparison's files (not paginated): with that many,
        others may be missing."""
        return len(self.files) >= COMPARE_MAX_FILES


def fit_description(text: str) -> str:
    """``text`` within GitHub's 140 characters, cut at a word with an ellipsis if need be."""
    if len(text) <= _MAX_DESCRIPTION:
        return text
    cut = text[: _MAX_DESCRIPTION - 1]
    if " " in cut[60:]:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" ,;:") + "…"


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    """GitHub's ``Retry-After`` in seconds, if it sent one we can read.

    GitHub sends seconds (on 403/429 for rate limits, sometimes on 5xx); the HTTP-date form
    is ignored and the caller's own backoff applies.
    """
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if seconds != seconds or seconds < 0:  # NaN or negative: not a wait
        return None
    return min(seconds, _MAX_RETRY_AFTER_S)

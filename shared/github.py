"""The few GitHub REST calls oa-machine makes: read a file at a commit, post a commit status.

The base URL is a setting so that tests and the demo can point it at a stand-in server. Which
GitHub errors are worth retrying is decided here, once (:func:`is_permanent`).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any, Final, Literal

import aiohttp

from shared.errors import GitHubError, NotACommit

STATUS_CONTEXT: Final = "openaddresses/machine"
StatusState = Literal["pending", "success", "failure", "error"]

#: A full commit SHA. Only these go into a URL: anything else could name another resource
#: (``..``, ``?``, ``/``) and can never be a commit anyway.
SHA_PATTERN: Final = r"^[0-9a-fA-F]{40}$"
_SHA = re.compile(SHA_PATTERN)

#: Answers no retry can change: a malformed request (400), a repository or commit that is not
#: there (404) or no longer is (410), a payload GitHub refuses (422).
PERMANENT_STATUSES: Final = frozenset({400, 404, 410, 422})

#: GitHub refuses descriptions longer than this.
_MAX_DESCRIPTION = 140
_TIMEOUT = aiohttp.ClientTimeout(total=60, connect=10)
#: A longer ``Retry-After`` is taken as this: a typo on the other side must not park a status
#: for years (nor overflow a ``timedelta``).
_MAX_RETRY_AFTER_S = 24 * 3600.0


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
        url = f"{self._api_url}/repos/{repo}/contents/{path}"
        body = await self._request("GET", url, params={"ref": ref})
        if not isinstance(body, dict) or body.get("type") != "file":
            raise GitHubError(f"{repo}/{path}@{ref} is not a file")
        if body.get("encoding") == "base64" and isinstance(body.get("content"), str):
            try:
                return base64.b64decode(body["content"], validate=False)
            except binascii.Error as exc:
                raise GitHubError(f"{repo}/{path}@{ref}: undecodable content") from exc
        # Files over 1 MB come without inline content; their raw form is one more request away.
        return await self._get_raw(url, ref)

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
            "description": description[:_MAX_DESCRIPTION],
            "context": context,
        }
        if target_url:
            payload["target_url"] = target_url
        await self._request("POST", f"{self._api_url}/repos/{repo}/statuses/{sha}", json=payload)

    async def _get_raw(self, url: str, ref: str) -> bytes:
        headers = {**self._headers, "Accept": "application/vnd.github.raw+json"}
        try:
            async with self._session.get(url, params={"ref": ref}, headers=headers) as response:
                if response.status >= 400:
                    raise GitHubError(
                        f"GET {url}: HTTP {response.status}", response.status,
                        retry_after_s=_retry_after_s(response.headers),
                    )
                return await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise GitHubError(f"GET {url}: {exc!r}") from exc

    async def _request(self, method: str, url: str, **kwargs: Any) -> Any:
        try:
            async with self._session.request(
                method, url, headers=self._headers, **kwargs
            ) as response:
                if response.status >= 400:
                    text = (await response.text())[:300]
                    raise GitHubError(
                        f"{method} {url}: HTTP {response.status}: {text}", response.status,
                        retry_after_s=_retry_after_s(response.headers),
                    )
                if response.status == 204:
                    return None
                return await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise GitHubError(f"{method} {url}: {exc!r}") from exc


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

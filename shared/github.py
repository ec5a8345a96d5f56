"""The few GitHub REST calls oa-machine makes: read a file at a commit, post a commit status.

The base URL is a setting so that tests and the demo can point it at a stand-in server.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Final, Literal

import aiohttp

from shared.errors import GitHubError

STATUS_CONTEXT: Final = "openaddresses/machine"
StatusState = Literal["pending", "success", "failure", "error"]

#: GitHub refuses descriptions longer than this.
_MAX_DESCRIPTION = 140
_TIMEOUT = aiohttp.ClientTimeout(total=60, connect=10)


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
        """The bytes of ``path`` in ``repo`` (``owner/name``) at commit ``ref``."""
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
        """Post a commit status for ``sha``."""
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
                    raise GitHubError(f"GET {url}: HTTP {response.status}", response.status)
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
                        f"{method} {url}: HTTP {response.status}: {text}", response.status
                    )
                if response.status == 204:
                    return None
                return await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise GitHubError(f"{method} {url}: {exc!r}") from exc

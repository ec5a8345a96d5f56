"""A small stand-in for the two GitHub REST endpoints oa-machine uses.

It serves file contents the way GitHub's contents API does (base64 JSON, 404 for unknown files)
and records every commit status posted to it. A test can script the answers to status requests
(:meth:`GitHubStandIn.answer_statuses`: say 500 three times, then 422). `oa-machine up` uses it
in demo mode, and the end-to-end tests use it as GitHub. It is a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class PostedStatus:
    repo: str
    sha: str
    state: str
    description: str
    target_url: str | None
    context: str


@dataclass(frozen=True)
class Answer:
    """A scripted answer to one status request: an HTTP error and maybe a ``Retry-After``."""

    status: int
    retry_after: str | None = None


@dataclass(frozen=True)
class StatusRequest:
    """One status request as received, and the HTTP status it was answered with."""

    sha: str
    state: str | None
    answered: int


@dataclass
class _Script:
    sha: str | None
    state: str | None
    answers: list[Answer]


@dataclass
class GitHubStandIn:
    """Files keyed by (repo, path, ref); ``fail_contents`` makes contents calls answer 500.

    ``statuses`` holds the statuses accepted, ``status_requests`` every status request seen
    (accepted or not); ``fail_statuses`` makes that many status requests answer 503.
    """

    files: dict[tuple[str, str, str], bytes] = field(default_factory=dict)
    statuses: list[PostedStatus] = field(default_factory=list)
    status_requests: list[StatusRequest] = field(default_factory=list)
    fail_contents: bool = False
    fail_statuses: int = 0
    _scripts: list[_Script] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    url: str = ""

    def add_file(self, repo: str, path: str, ref: str, content: bytes) -> None:
        self.files[(repo, path, ref)] = content

    def answer_statuses(
        self, *answers: int | Answer, sha: str | None = None, state: str | None = None
    ) -> None:
        """Answer the next status requests (only those for ``sha``/``state`` if given) with
        ``answers``, one each, in order; afterwards such requests are served normally again.
        """
        self._scripts.append(_Script(sha, state, [
            answer if isinstance(answer, Answer) else Answer(answer) for answer in answers
        ]))

    def requests_for(self, sha: str, state: str | None = None) -> list[int]:
        """The HTTP statuses answered to the status requests for ``sha`` (and ``state``)."""
        return [r.answered for r in self.status_requests
                if r.sha == sha and (state is None or r.state == state)]

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start serving; returns the base URL to use as ``GITHUB_API_URL``."""
        app = web.Application()
        app.router.add_get("/repos/{owner}/{name}/contents/{path:.+}", self._contents)
        app.router.add_post("/repos/{owner}/{name}/statuses/{sha}", self._status)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_port = self._runner.addresses[0][1]
        self.url = f"http://{host}:{bound_port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def states(self, sha: str | None = None) -> list[str]:
        """The states posted so far, in order, optionally for one commit."""
        return [s.state for s in self.statuses if sha is None or s.sha == sha]

    async def _contents(self, request: web.Request) -> web.Response:
        if self.fail_contents:
            return web.json_response({"message": "Server Error"}, status=500)
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        path = request.match_info["path"]
        ref = request.query.get("ref", "")
        content = self.files.get((repo, path, ref))
        if content is None:
            return web.json_response({"message": "Not Found"}, status=404)
        return web.json_response({
            "type": "file", "encoding": "base64", "path": path, "name": path.rsplit("/", 1)[-1],
            "size": len(content), "content": base64.encodebytes(content).decode(),
        })

    async def _status(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        sha, state = request.match_info["sha"], body.get("state")
        answer = self._scripted(sha, state)
        if answer is None and self.fail_statuses > 0:
            self.fail_statuses -= 1
            answer = Answer(503)
        if answer is None and state not in {"pending", "success", "failure", "error"}:
            answer = Answer(422)
        self.status_requests.append(StatusRequest(sha, state, answer.status if answer else 201))
        if answer is not None:
            headers = {"Retry-After": answer.retry_after} if answer.retry_after else None
            return web.json_response({"message": f"HTTP {answer.status} (stand-in)"},
                                     status=answer.status, headers=headers)
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        self.statuses.append(PostedStatus(
            repo=repo, sha=request.match_info["sha"], state=body["state"],
            description=body.get("description", ""), target_url=body.get("target_url"),
            context=body.get("context", "default"),
        ))
        return web.json_response({"id": len(self.statuses), "state": body["state"]}, status=201)

    def _scripted(self, sha: str, state: str | None) -> Answer | None:
        for script in self._scripts:
            if script.answers and script.sha in (None, sha) and script.state in (None, state):
                return script.answers.pop(0)
        return None

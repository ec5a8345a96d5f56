"""A small stand-in for the GitHub REST endpoints oa-machine uses.

It serves file contents the way GitHub's contents API does (base64 JSON, 404 for unknown
files), a pull request's files (paginated with a ``Link`` header, as GitHub does), comparisons,
and keeps the commit statuses and issue comments posted to it. A test can script the answers to
status requests (:meth:`GitHubStandIn.answer_statuses`: say 500 three times, then 422), make
the next requests fail (:meth:`GitHubStandIn.fail_next`) or hit a rate limit
(:meth:`GitHubStandIn.limit_rate`). `oa-machine up` uses it in demo mode, and the end-to-end
tests use it as GitHub. It is a real HTTP server on 127.0.0.1. ``GET /_stand-in/received``
lists the statuses and comments it holds (the webhook's ``/demo/github`` shows them).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

#: Read-only: what the stand-in received, for the webhook's /demo/github page (the stand-in
#: runs in the `oa-machine up` process, the webhook in another).
RECEIVED_PATH = "/_stand-in/received"


def git_blob_sha(content: bytes) -> str:
    """The SHA git gives a file's content (``blob <size>\\0`` + content, SHA-1)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content, usedforsecurity=False).hexdigest()


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
    #: (repo, number) -> the files of the pull request, as GitHub lists them.
    pulls: dict[tuple[str, int], list[dict[str, Any]]] = field(default_factory=dict)
    #: (repo, number) -> what ``GET pulls/{n}`` answers (``set_pull_head``).
    pull_heads: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    #: (repo, base, head) -> (merge base SHA, files).
    comparisons: dict[tuple[str, str, str], tuple[str, list[dict[str, Any]]]] = field(
        default_factory=dict)
    #: comment id -> (repo, issue number, body), and every comment request as (method, id).
    comments: dict[int, tuple[str, int, str]] = field(default_factory=dict)
    comment_requests: list[tuple[str, int]] = field(default_factory=list)
    #: Every request seen, as (method, path), in order.
    requests: list[tuple[str, str]] = field(default_factory=list)
    #: Requests answered 500 before any is served again (``fail_next``).
    _failing: int = 0
    #: Until then (epoch seconds) requests are refused as over the rate limit.
    _limited_until: float = 0.0
    #: Every answer waits this long first (a slow GitHub).
    delay_s: float = 0.0
    #: repo -> (default branch, head commit, {path: content}) served as a git tree and blobs.
    trees: dict[str, tuple[str, str, dict[str, bytes]]] = field(default_factory=dict)
    #: (repo, commit) -> {path: content}: trees of other commits than a default branch's head.
    commit_trees: dict[tuple[str, str], dict[str, bytes]] = field(default_factory=dict)
    #: Blob SHA -> content of every file ever served in a tree.
    _blobs: dict[str, bytes] = field(default_factory=dict)
    #: How many blobs were asked for (a set must not read an unchanged file again).
    blob_reads: int = 0
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

    def set_pull_head(
        self, repo: str, number: int, *, head_sha: str, head_repo: str | None, base_sha: str,
        author: str = "contributor", state: str = "open",
    ) -> None:
        """What ``GET pulls/{number}`` answers: the pull request's head, base and author."""
        self.pull_heads[(repo, number)] = {
            "number": number, "state": state, "user": {"login": author},
            "updated_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "head": {"sha": head_sha, "ref": f"pr-{number}",
                     "repo": {"full_name": head_repo} if head_repo else None},
            "base": {"sha": base_sha, "ref": "master", "repo": {"full_name": repo}},
        }

    def add_pull(self, repo: str, number: int, files: list[dict[str, Any]]) -> None:
        """Serve ``files`` (``{"filename", "status"[, "previous_filename"]}``) for the pull
        request."""
        self.pulls[(repo, number)] = files

    def add_comparison(
        self, repo: str, base: str, head: str, merge_base: str, files: list[dict[str, Any]]
    ) -> None:
        self.comparisons[(repo, base, head)] = (merge_base, files)

    def set_tree(self, repo: str, branch: str, head: str, files: dict[str, bytes]) -> None:
        """Serve ``files`` as the tree of ``head``, the head of ``branch``, the default branch;
        blob SHAs are git's own (so an unchanged file keeps its SHA)."""
        self.trees[repo] = (branch, head, dict(files))
        for content in files.values():
            self._blobs[git_blob_sha(content)] = content

    def add_commit_tree(self, repo: str, sha: str, files: dict[str, bytes]) -> None:
        """Serve ``files`` as the tree of the commit ``sha`` (and their blobs)."""
        self.commit_trees[(repo, sha)] = dict(files)
        for content in files.values():
            self._blobs[git_blob_sha(content)] = content

    def fail_next(self, count: int) -> None:
        """Answer the next ``count`` requests (of any kind) with 500."""
        self._failing = count

    def limit_rate(self, seconds: float) -> None:
        """Refuse requests as over the rate limit for ``seconds`` (403, remaining 0, reset)."""
        self._limited_until = time.time() + seconds

    def requests_for(self, sha: str, state: str | None = None) -> list[int]:
        """The HTTP statuses answered to the status requests for ``sha`` (and ``state``)."""
        return [r.answered for r in self.status_requests
                if r.sha == sha and (state is None or r.state == state)]

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start serving; returns the base URL to use as ``GITHUB_API_URL``."""
        app = web.Application(middlewares=[self._trouble])
        app.router.add_get("/repos/{owner}/{name}/contents/{path:.+}", self._contents)
        app.router.add_post("/repos/{owner}/{name}/statuses/{sha}", self._status)
        app.router.add_get("/repos/{owner}/{name}/pulls/{number:\\d+}/files", self._pull_files)
        app.router.add_get("/repos/{owner}/{name}/pulls/{number:\\d+}", self._pull)
        app.router.add_get("/repos/{owner}/{name}/compare/{spec}", self._compare)
        app.router.add_get("/repos/{owner}/{name}", self._repository)
        app.router.add_get("/repos/{owner}/{name}/branches/{branch}", self._branch)
        app.router.add_get("/repos/{owner}/{name}/git/trees/{sha}", self._tree)
        app.router.add_get("/repos/{owner}/{name}/git/blobs/{sha}", self._blob)
        app.router.add_post("/repos/{owner}/{name}/issues/{number:\\d+}/comments",
                            self._create_comment)
        app.router.add_patch("/repos/{owner}/{name}/issues/comments/{id:\\d+}",
                             self._update_comment)
        app.router.add_get(RECEIVED_PATH, self._received)
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

    @web.middleware
    async def _trouble(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == RECEIVED_PATH:  # ours, not GitHub's: never scripted or counted
            own: web.StreamResponse = await handler(request)
            return own
        self.requests.append((request.method, request.path))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self._limited_until > time.time():
            return web.json_response(
                {"message": "API rate limit exceeded"}, status=403,
                headers={"X-RateLimit-Remaining": "0",
                         "X-RateLimit-Reset": str(int(self._limited_until) + 1)},
            )
        if self._failing > 0:
            self._failing -= 1
            return web.json_response({"message": "Server Error (stand-in)"}, status=500)
        response: web.StreamResponse = await handler(request)
        return response

    async def _pull(self, request: web.Request) -> web.Response:
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        found = self.pull_heads.get((repo, int(request.match_info["number"])))
        if found is None:
            return web.json_response({"message": "Not Found"}, status=404)
        return web.json_response(found)

    async def _pull_files(self, request: web.Request) -> web.Response:
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        files = self.pulls.get((repo, int(request.match_info["number"])))
        if files is None:
            return web.json_response({"message": "Not Found"}, status=404)
        per_page = int(request.query.get("per_page", "30"))
        page = int(request.query.get("page", "1"))
        chunk = files[(page - 1) * per_page: page * per_page]
        headers = {}
        if page * per_page < len(files):
            next_url = request.url.with_query({"per_page": str(per_page), "page": str(page + 1)})
            headers["Link"] = f'<{next_url}>; rel="next"'
        return web.json_response(chunk, headers=headers)

    def _tree_of(self, request: web.Request) -> tuple[str, str, dict[str, bytes]] | None:
        return self.trees.get(f"{request.match_info['owner']}/{request.match_info['name']}")

    async def _repository(self, request: web.Request) -> web.Response:
        tree = self._tree_of(request)
        if tree is None:
            return web.json_response({"message": "Not Found"}, status=404)
        return web.json_response({"default_branch": tree[0]})

    async def _branch(self, request: web.Request) -> web.Response:
        tree = self._tree_of(request)
        if tree is None or request.match_info["branch"] != tree[0]:
            return web.json_response({"message": "Branch not found"}, status=404)
        return web.json_response({"name": tree[0], "commit": {"sha": tree[1]}})

    async def _tree(self, request: web.Request) -> web.Response:
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        sha = request.match_info["sha"]
        files = self.commit_trees.get((repo, sha))
        if files is None:
            tree = self._tree_of(request)
            if tree is None or sha != tree[1]:
                return web.json_response({"message": "Not Found"}, status=404)
            files = tree[2]
        items = [{"path": path, "type": "blob", "sha": git_blob_sha(content), "mode": "100644"}
                 for path, content in sorted(files.items())]
        return web.json_response({"sha": sha, "tree": items, "truncated": False})

    async def _blob(self, request: web.Request) -> web.Response:
        wanted = request.match_info["sha"]
        content = self._blobs.get(wanted) if self._tree_of(request) is not None else None
        if content is None:
            return web.json_response({"message": "Not Found"}, status=404)
        self.blob_reads += 1
        return web.json_response({
            "sha": wanted, "encoding": "base64", "size": len(content),
            "content": base64.encodebytes(content).decode(),
        })

    async def _compare(self, request: web.Request) -> web.Response:
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        base, _, head = request.match_info["spec"].partition("...")
        found = self.comparisons.get((repo, base, head))
        if found is None:
            return web.json_response({"message": "Not Found"}, status=404)
        merge_base, files = found
        return web.json_response({"merge_base_commit": {"sha": merge_base}, "files": files})

    async def _create_comment(self, request: web.Request) -> web.Response:
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        body = (await request.json()).get("body", "")
        comment_id = 1000 + len(self.comments)
        self.comments[comment_id] = (repo, int(request.match_info["number"]), body)
        self.comment_requests.append(("POST", comment_id))
        return web.json_response({"id": comment_id, "body": body}, status=201)

    async def _update_comment(self, request: web.Request) -> web.Response:
        comment_id = int(request.match_info["id"])
        if comment_id not in self.comments:
            return web.json_response({"message": "Not Found"}, status=404)
        repo, number, _old = self.comments[comment_id]
        body = (await request.json()).get("body", "")
        self.comments[comment_id] = (repo, number, body)
        self.comment_requests.append(("PATCH", comment_id))
        return web.json_response({"id": comment_id, "body": body})

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

    async def _received(self, request: web.Request) -> web.Response:
        """What GitHub would show: the statuses accepted and the comments as they are now."""
        return web.json_response({
            "statuses": [asdict(status) for status in self.statuses],
            "comments": [{"id": comment_id, "repo": repo, "number": number, "body": body}
                         for comment_id, (repo, number, body) in self.comments.items()],
        })

    def _scripted(self, sha: str, state: str | None) -> Answer | None:
        for script in self._scripts:
            if script.answers and script.sha in (None, sha) and script.state in (None, state):
                return script.answers.pop(0)
        return None

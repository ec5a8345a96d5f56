"""A real HTTP data provider on 127.0.0.1 with programmable failures.

Two ways to run it (and ``FakeArcGIS``, which shares the base class):

* async, on the test's event loop::

      async with DataServer() as server:
          url = server.add("/a.csv", b"x,y\\n")

* in a thread with its own loop, for code under test that is synchronous (``fetch`` runs
  ``asyncio.run`` itself, which cannot nest in the test's loop)::

      with DataServer().running() as server:
          url = server.add("/a.csv", b"x,y\\n")

Every request is recorded in ``server.requests``.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from aiohttp import web
from multidict import CIMultiDict


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    body: bytes


class AppServer:
    """Runs an ``aiohttp.web.Application`` on 127.0.0.1 on a free port."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    def build_app(self) -> web.Application:
        raise NotImplementedError

    @property
    def base_url(self) -> str:
        if self._port is None:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self._port}"

    def url(self, path: str) -> str:
        return self.base_url + "/" + path.lstrip("/")

    def count(self, path: str) -> int:
        """How many requests reached ``path``."""
        return sum(1 for request in self.requests if request.path == path)

    async def record(self, request: web.Request) -> RecordedRequest:
        recorded = RecordedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers=CIMultiDict(request.headers),
            body=await request.read(),
        )
        self.requests.append(recorded)
        return recorded

    async def start(self) -> Self:
        # Handlers are cancelled when the client goes away, and shutdown does not wait long,
        # so a deliberately stalled response never slows a test's teardown.
        self._runner = web.AppRunner(
            self.build_app(), handler_cancellation=True, shutdown_timeout=0.5, access_log=None
        )
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @contextmanager
    def running(self) -> Iterator[Self]:
        """Serve from a thread with its own event loop for the duration of the block."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=type(self).__name__, daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result(timeout=10)
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(self.close(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()


@dataclass
class Route:
    """How the server answers one path."""

    body: bytes = b""
    status: int = 200
    content_type: str = "application/octet-stream"
    headers: dict[str, str] = field(default_factory=dict)
    etag: str | None = None
    last_modified: str | None = None
    #: Headers the client must send, else 403.
    required_headers: dict[str, str] = field(default_factory=dict)
    #: Statuses answered (one per request) before the real answer, e.g. [500, 503].
    failures: list[int] = field(default_factory=list)
    #: Wait this long before answering at all.
    delay_s: float = 0.0
    #: Send this many body bytes, then go silent for ``stall_s`` (an idle connection).
    stall_after_bytes: int | None = None
    stall_s: float = 0.0
    #: Answer with a redirect to this URL.
    redirect_to: str | None = None
    #: Send the body with chunked transfer encoding, announcing no Content-Length.
    chunked: bool = False


class DataServer(AppServer):
    """Serves bytes at paths, with the failure modes data providers show in the wild."""

    def __init__(self) -> None:
        super().__init__()
        self.routes: dict[str, Route] = {}

    def add(self, path: str, body: bytes = b"", **options: object) -> str:
        """Serve ``body`` at ``path`` (options are ``Route`` fields); returns its URL."""
        path = "/" + path.lstrip("/")
        self.routes[path] = Route(body=body, **options)  # type: ignore[arg-type]
        return self.url(path)

    def add_file(self, path: str, source: Path, **options: object) -> str:
        return self.add(path, source.read_bytes(), **options)

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        recorded = await self.record(request)
        route = self.routes.get(request.path)
        if route is None:
            return web.Response(status=404, text="not found")
        if route.delay_s:
            await asyncio.sleep(route.delay_s)
        if route.failures:
            return web.Response(status=route.failures.pop(0), text="failure on purpose")
        missing = _missing_headers(recorded.headers, route.required_headers)
        if missing:
            return web.Response(status=403, text=f"missing headers {missing}")
        if route.redirect_to is not None:
            raise web.HTTPFound(route.redirect_to)
        if _not_modified(recorded.headers, route):
            return web.Response(status=304)
        return await self._send(request, route)

    async def _send(self, request: web.Request, route: Route) -> web.StreamResponse:
        response = web.StreamResponse(status=route.status, headers=route.headers)
        response.content_type = route.content_type
        if route.chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = len(route.body)
        if route.etag:
            response.headers["ETag"] = route.etag
        if route.last_modified:
            response.headers["Last-Modified"] = route.last_modified
        await response.prepare(request)
        if route.stall_after_bytes is None:
            await response.write(route.body)
        else:
            await response.write(route.body[: route.stall_after_bytes])
            await asyncio.sleep(route.stall_s)
            await response.write(route.body[route.stall_after_bytes :])
        await response.write_eof()
        return response


def _missing_headers(sent: Mapping[str, str], required: Mapping[str, str]) -> list[str]:
    return [name for name, value in required.items() if sent.get(name) != value]


def _not_modified(sent: Mapping[str, str], route: Route) -> bool:
    if route.etag and sent.get("If-None-Match") == route.etag:
        return True
    return bool(route.last_modified and sent.get("If-Modified-Since") == route.last_modified)

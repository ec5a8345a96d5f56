"""The small HTTP server of the worker, dequeuer and scheduler: metrics and health probes.

* ``GET /metrics``: Prometheus text format, from :mod:`shared.metrics` and the process
  collectors of ``prometheus-client``.
* ``GET /health/live``: 200 while the process's event loop answers. It never asks PostgreSQL or
  RabbitMQ: an outage of either must not make Kubernetes restart every pod, since the services
  wait for them and carry on by themselves.
* ``GET /health/ready``: 200 when every readiness check passes (connected to what the service
  needs), else 503 with the failing checks. Each check has :data:`CHECK_TIMEOUT_S`.

The webhook serves the same three paths on its own port (``services/webhook/routes.py``), with
the same handlers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from shared.broker import Broker
from shared.logging import get_logger

log = get_logger(__name__)

#: A readiness check: returns when fine, raises (anything) when not.
Check = Callable[[], Awaitable[None]]
CHECK_TIMEOUT_S = 3.0
_STARTED = web.AppKey("started_monotonic", float)


def database_check(pool: asyncpg.Pool) -> Check:
    """Ready when PostgreSQL answers a query."""

    async def check() -> None:
        await pool.fetchval("SELECT 1")

    return check


def broker_check(broker: Broker) -> Check:
    """Ready when the RabbitMQ connection and its publishing channel are open."""

    async def check() -> None:
        if not broker.ready:
            raise ConnectionError("not connected to RabbitMQ")

    return check


async def metrics_view(request: web.Request) -> web.Response:
    """Prometheus scrape endpoint."""
    body = await asyncio.to_thread(generate_latest, REGISTRY)
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def live_view(request: web.Request) -> web.Response:
    """Liveness: answering at all is the proof."""
    started = request.app.get(_STARTED, time.monotonic())
    return web.json_response({"status": "alive", "uptime_s": round(time.monotonic() - started, 1)})


async def run_checks(checks: Mapping[str, Check]) -> tuple[bool, dict[str, str]]:
    """Run every check concurrently; ``(all passed, name -> "ok" or the error)``."""

    async def one(check: Check) -> str:
        try:
            await asyncio.wait_for(check(), CHECK_TIMEOUT_S)
        except Exception as exc:  # any failure means "not ready"; the reason is reported
            return f"{type(exc).__name__}: {exc}"[:300]
        return "ok"

    names = list(checks)
    results = await asyncio.gather(*(one(checks[name]) for name in names))
    answers = dict(zip(names, results, strict=True))
    return all(result == "ok" for result in results), answers


def ready_view(
    checks: Mapping[str, Check],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Readiness: connected to what this service needs (the given checks)."""

    async def view(request: web.Request) -> web.Response:
        ok, answers = await run_checks(checks)
        return web.json_response(
            {"status": "ready" if ok else "unavailable", "checks": answers},
            status=200 if ok else 503,
        )

    return view


def add_probe_routes(app: web.Application, checks: Mapping[str, Check]) -> None:
    """Add /metrics, /health/live and /health/ready to ``app``."""
    app[_STARTED] = time.monotonic()
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/health/live", live_view)
    app.router.add_get("/health/ready", ready_view(dict(checks)))


class ProbeServer:
    """``/metrics`` and the health probes on ``host:port`` (0 picks a free port)."""

    def __init__(
        self,
        host: str,
        port: int,
        checks: Mapping[str, Check],
        routes: Mapping[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._app = web.Application()
        add_probe_routes(self._app, checks)
        for path, handler in (routes or {}).items():
            self._app.router.add_get(path, handler)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> int:
        """Listen; returns the port."""
        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        sockets = self._runner.addresses
        self.port = int(sockets[0][1]) if sockets else self._port
        log.info("probes.listening", host=self._host, port=self.port)
        return self.port

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> ProbeServer:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

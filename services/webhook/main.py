"""Entry point of the webhook service."""

from __future__ import annotations

import asyncio

from aiohttp import web

from services.webhook.app import create_app
from shared.config import Settings
from shared.errors import ConfigError
from shared.logging import get_logger
from shared.runner import run_service

log = get_logger(__name__)


def run(settings: Settings) -> None:
    """Serve until interrupted."""
    if not settings.webhook_secrets:
        # Without a secret every delivery would be refused: say so at start, not per request.
        raise ConfigError("invalid setting WEBHOOK_SECRETS: at least one secret is required")
    run_service(serve(create_app(settings), settings.http_host, settings.http_port))


async def serve(app: web.Application, host: str, port: int) -> None:
    """Serve ``app`` on ``host:port`` until cancelled, logging the address when it starts
    listening and when it stops (port 0: the one the system picked)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    url = None
    try:
        await web.TCPSite(runner, host, port).start()
        bound_host, bound_port = runner.addresses[0][:2]
        url = f"http://{_host(bound_host)}:{bound_port}/"
        log.info("webhook.listening", url=url)
        await asyncio.Event().wait()  # until cancelled (SIGINT, SIGTERM)
    finally:
        # In-flight requests get the runner's shutdown grace before the app is cleaned up.
        await runner.cleanup()
        if url is not None:
            log.info("webhook.stopped", url=url)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host

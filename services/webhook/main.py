"""Entry point of the webhook service."""

from __future__ import annotations

from aiohttp import web

from services.webhook.app import create_app
from shared.config import Settings
from shared.errors import ConfigError


def run(settings: Settings) -> None:
    """Serve until interrupted."""
    if not settings.webhook_secrets:
        # Without a secret every delivery would be refused: say so at start, not per request.
        raise ConfigError("invalid setting WEBHOOK_SECRETS: at least one secret is required")
    web.run_app(
        create_app(settings), host=settings.http_host, port=settings.http_port,
        print=None, access_log=None, handle_signals=True,
    )

"""The webhook service's aiohttp application: GitHub deliveries in, pages and JSON out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import jinja2
from aiohttp import web

from services.webhook import routes
from services.webhook.keys import BROKER, GITHUB, POOL, SETTINGS, STORAGE, TEMPLATES
from shared.broker import Broker
from shared.config import Settings
from shared.db import create_pool
from shared.github import GitHub
from shared.storage import open_storage

#: GitHub caps webhook payloads at 25 MB.
MAX_BODY_BYTES = 25 * 1024 * 1024 + 1024


def create_app(settings: Settings) -> web.Application:
    """Build the application; resources open on start-up and close on clean-up."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[routes.error_pages])
    app[SETTINGS] = settings
    app[TEMPLATES] = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    app.cleanup_ctx.extend([_database, _broker, _github, _storage])
    routes.add_routes(app)
    return app


async def _database(app: web.Application) -> AsyncIterator[None]:
    pool = await create_pool(app[SETTINGS].database_url)
    app[POOL] = pool
    yield
    await pool.close()


async def _broker(app: web.Application) -> AsyncIterator[None]:
    broker = await Broker.connect(app[SETTINGS].amqp_url)
    app[BROKER] = broker
    yield
    await broker.close()


async def _github(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    token = settings.github_token.get_secret_value() if settings.github_token else None
    github = GitHub.open(settings.github_api_url, token)
    app[GITHUB] = github
    yield
    await github.close()


async def _storage(app: web.Application) -> AsyncIterator[None]:
    async with open_storage(app[SETTINGS]) as storage:
        app[STORAGE] = storage
        yield

"""The webhook service's aiohttp application: GitHub deliveries in; the results site (pages,
files, the JSON API) out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from services.webhook import routes
from services.webhook.budget import ByteBudget
from services.webhook.deliveries import DeliveryProcessor
from services.webhook.keys import (
    BODY_BUDGET,
    BROKER,
    GITHUB,
    POOL,
    PROCESSOR,
    SETTINGS,
    SITE_CACHE,
    STORAGE,
    TEMPLATES,
)
from services.webhook.views.cache import SiteCache
from services.webhook.views.render import environment
from shared.broker import Broker
from shared.config import Settings
from shared.db import close_pool, create_pool, warm_pool
from shared.github import GitHub
from shared.probes import add_probe_routes, broker_check, database_check
from shared.storage import open_storage

#: PostgreSQL connections of one webhook process (requests, the delivery processor, pages).
POOL_SIZE = 10


def create_app(settings: Settings) -> web.Application:
    """Build the application; resources open on start-up and close on clean-up."""
    app = web.Application(
        client_max_size=routes.MAX_BODY_BYTES, middlewares=[routes.error_pages]
    )
    app[SETTINGS] = settings
    app[BODY_BUDGET] = ByteBudget(routes.BODY_BUDGET_BYTES)
    app[TEMPLATES] = environment()
    app[SITE_CACHE] = SiteCache()
    app.cleanup_ctx.extend([_database, _broker, _github, _storage, _deliveries])
    routes.add_routes(app)

    # The resources exist only once the app has started: the checks look them up when run.
    async def database_ready() -> None:
        await database_check(app[POOL])()

    async def broker_ready() -> None:
        await broker_check(app[BROKER])()

    add_probe_routes(app, {"database": database_ready, "broker": broker_ready})
    return app


async def _database(app: web.Application) -> AsyncIterator[None]:
    # min_size=0: the service starts and answers (503 where it needs the database) while
    # PostgreSQL is down, and the pool connects once it is back. Deliveries come in bursts
    # after quiet hours: the connections are opened in the background at start and kept
    # however long they are idle, so a burst never waits for new ones.
    pool = await create_pool(app[SETTINGS].database_url, min_size=0, max_size=POOL_SIZE,
                             keep_idle=True)
    app[POOL] = pool
    warming = asyncio.create_task(warm_pool(pool, POOL_SIZE))
    yield
    warming.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await warming
    await close_pool(pool)


async def _broker(app: web.Application) -> AsyncIterator[None]:
    # Connects in the background: runs the broker does not take stay unqueued meanwhile and
    # the dequeuer queues them later (shared/dispatch.py).
    broker = Broker(app[SETTINGS].amqp_url)
    broker.start()
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


async def _deliveries(app: web.Application) -> AsyncIterator[None]:
    # Stored deliveries become jobs here, in the background; unfinished ones from before a
    # restart are taken up again at once.
    processor = DeliveryProcessor(app[POOL], app[BROKER], app[GITHUB], app[SETTINGS])
    app[PROCESSOR] = processor
    task = asyncio.create_task(processor.run())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _storage(app: web.Application) -> AsyncIterator[None]:
    async with open_storage(app[SETTINGS]) as storage:
        app[STORAGE] = storage
        yield

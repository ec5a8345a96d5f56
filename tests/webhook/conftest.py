"""Fixtures of the results site's tests: the app over real PostgreSQL, RabbitMQ and storage,
with the seeded world of ``site_data.py`` (seeded before the app starts)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.demo.github import GitHubStandIn
from services.webhook.app import create_app
from services.webhook.keys import BROKER
from shared.broker import Broker
from shared.config import Settings
from shared.storage import open_storage
from tests.webhook.site_data import World, seed_world

PUBLIC_BASE_URL = "http://oa.example.org"


@pytest.fixture
async def site_github() -> AsyncIterator[GitHubStandIn]:
    stand_in = GitHubStandIn()
    await stand_in.start()
    yield stand_in
    await stand_in.stop()


@pytest.fixture
def site_settings(settings: Settings, site_github: GitHubStandIn) -> Settings:
    """Demo mode (no GitHub token): GitHub links go to /demo/github, which asks the stand-in."""
    return settings.model_copy(update={
        "github_api_url": site_github.url, "webhook_secrets": [],
        "public_base_url": PUBLIC_BASE_URL,
    })


@pytest.fixture
async def site_world(site_settings: Settings, db_pool: asyncpg.Pool) -> World:
    async with open_storage(site_settings) as storage:
        return await seed_world(db_pool, storage)


async def start_site(settings: Settings) -> TestClient[Any, Any]:
    """A client of the real app on 127.0.0.1, its broker connected (the workers page asks
    RabbitMQ for queue depths)."""
    app = create_app(settings)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    await app[BROKER].wait_ready(timeout_s=30)
    return client


@pytest.fixture
async def site(
    site_settings: Settings, site_world: World, broker: Broker
) -> AsyncIterator[TestClient[Any, Any]]:
    # broker first: the topology is declared and the queues are empty before the app starts.
    client = await start_site(site_settings)
    try:
        yield client
    finally:
        await client.close()

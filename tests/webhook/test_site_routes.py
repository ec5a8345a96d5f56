"""Every page, file and API route of the results site over the seeded world of
``site_data.py`` (real PostgreSQL, RabbitMQ and local storage)."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from tests.webhook.site_data import World

Client = TestClient[Any, Any]


async def test_pages_answer(site: Client, site_world: World) -> None:
    world = site_world
    for path in ("/", "/jobs/", f"/jobs/{world.jobs['push']}", f"/runs/{world.runs['set_good']}",
                 "/sources/", "/sources/us/ca/alameda", "/sets/", f"/sets/{world.sets['open']}",
                 "/workers", "/api/", "/state.txt", "/index.json", "/api/openapi.json"):
        response = await site.get(path)
        assert response.status == 200, (path, await response.text())

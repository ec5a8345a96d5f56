"""The downloads on the site: /downloads, / and /index.json list the current collections and
link their files; /latest/collection/{name}.zip redirects to the current file; the coverage
maps are served."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient

from shared.config import Settings
from shared.storage import open_storage
from tests.webhook.conftest import PUBLIC_BASE_URL

Client = TestClient[Any, Any]
BUILT = datetime(2026, 12, 1, 3, tzinfo=UTC)


async def add_collection(pool: asyncpg.Pool, settings: Settings, name: str, stamp: str,
                         built_at: datetime, body: bytes, *, region: str = "global",
                         layer: str = "addresses", share_alike: bool = False) -> str:
    key = f"collections/{stamp}/{name}"
    async with open_storage(settings) as storage:
        await storage.put_bytes(key, body)
    await pool.execute(
        """
        INSERT INTO collections (name, region, layer, share_alike, storage_key, size_bytes,
                                 feature_count, source_count, run_ids, built_at)
        VALUES ($1, $2, $3, $4, $5, $6, 1234567, 12, '{}', $7)
        """, name, region, layer, share_alike, key, len(body), built_at)
    return key


async def test_downloads_listed_and_linked(site: Client, site_settings: Settings,
                                           db_pool: asyncpg.Pool) -> None:
    await add_collection(db_pool, site_settings, "openaddr-collected-global.zip", "old",
                         BUILT - timedelta(days=2), b"old zip")
    current = await add_collection(db_pool, site_settings, "openaddr-collected-global.zip",
                                   "new", BUILT, b"new zip" * 1000)
    await add_collection(db_pool, site_settings, "openaddr-collected-europe-sa.zip", "new",
                         BUILT, b"sa", region="europe", share_alike=True)
    await add_collection(db_pool, site_settings, "openaddr-collected-global-parcels.zip", "new",
                         BUILT, b"parcels", layer="parcels")
    async with open_storage(site_settings) as storage:
        await storage.put_bytes("coverage/x/world.png", b"\x89PNG fake")
        await storage.put_bytes("coverage/x/coverage.geojson", b'{"type":"FeatureCollection"}')
    await db_pool.execute(
        "INSERT INTO coverage_maps (files, counts) VALUES ($1, $2)",
        {"world.png": "coverage/x/world.png", "coverage.geojson": "coverage/x/coverage.geojson"},
        {"good": 3, "failed": 1})

    page = await (await site.get("/downloads")).text()
    for name in ("openaddr-collected-global.zip", "openaddr-collected-europe-sa.zip",
                 "openaddr-collected-global-parcels.zip"):
        assert f'href="/latest/collection/{name}"' in page
    assert "6.8 MiB" not in page and "0.0 MiB" in page  # sizes as MiB
    assert page.index("openaddr-collected-global.zip") < page.index("europe-sa")
    assert 'src="/coverage/world.png"' in page and 'href="/coverage/coverage.geojson"' in page

    home = await (await site.get("/")).text()
    assert 'href="/latest/collection/openaddr-collected-global.zip"' in home
    assert "1,234,567 addresses" in home and 'href="/downloads"' in home
    assert "global-parcels" not in home  # other layers: on the downloads page

    index = await (await site.get("/index.json")).json()
    entry = index["collections"]["openaddr-collected-global.zip"]
    assert entry["url"] == f"{PUBLIC_BASE_URL}/latest/collection/openaddr-collected-global.zip"
    assert entry["size_bytes"] == 7000 and entry["count"] == 1234567
    assert index["coverage"]["world.png"] == f"{PUBLIC_BASE_URL}/coverage/world.png"
    assert index["downloads_url"] == f"{PUBLIC_BASE_URL}/downloads"

    redirect = await site.get("/latest/collection/openaddr-collected-global.zip",
                              allow_redirects=False)
    assert redirect.status == 302 and redirect.headers["Location"] == "/" + current
    served = await site.get(redirect.headers["Location"])
    assert served.status == 200 and await served.read() == b"new zip" * 1000
    assert served.headers["Content-Type"] == "application/zip"
    assert "openaddr-collected-global.zip" in served.headers["Content-Disposition"]
    # The previous file still downloads; unknown names and keys do not.
    assert await (await site.get("/collections/old/openaddr-collected-global.zip")).read() \
        == b"old zip"
    assert (await site.get("/collections/zzz/openaddr-collected-global.zip")).status == 404
    assert (await site.get("/latest/collection/openaddr-collected-mars.zip",
                           allow_redirects=False)).status == 404

    png = await site.get("/coverage/world.png")
    assert png.status == 200 and png.headers["Content-Type"] == "image/png"
    assert (await site.get("/coverage/us.png")).status == 404


async def test_downloads_before_anything_is_built(site: Client) -> None:
    page = await (await site.get("/downloads")).text()
    assert "No collection has been built yet." in page and "No coverage maps yet" in page
    index = await (await site.get("/index.json")).json()
    assert index["collections"] == {} and index["coverage"] == {}

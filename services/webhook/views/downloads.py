"""The downloads: the current regional collections (``/downloads``, ``/``, ``/index.json``),
their files (``/collections/{stamp}/{name}``, streamed from storage), the stable
``/latest/collection/{name}.zip`` links to the current one, and the coverage maps
(``/coverage/{file}``). The scheduler builds and records them (migration 0008)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web

from services.webhook.keys import POOL
from services.webhook.views.files import stream_object
from services.webhook.views.render import page
from services.webhook.views.sql import query
from shared.regions import REGIONS

#: The newest zip of each name; older ones stay listed in COLLECTION_FILES until deleted.
CURRENT_COLLECTIONS = query("downloads.current", """
    SELECT DISTINCT ON (name) name, region, layer, share_alike, storage_key, size_bytes,
           feature_count, source_count, sources_sha, built_at
    FROM collections WHERE deleted_at IS NULL
    ORDER BY name, built_at DESC, id DESC
""")
#: Every zip still in storage (the current ones and the one before each).
COLLECTION_FILES = query("downloads.files", """
    SELECT storage_key FROM collections WHERE deleted_at IS NULL
""")
CURRENT_MAPS = query("downloads.maps", """
    SELECT files, counts, drawn_at FROM coverage_maps ORDER BY drawn_at DESC, id DESC LIMIT 1
""")
MAP_FILES = ("world.png", "us.png", "europe.png", "coverage.geojson")
_TYPES = {".zip": "application/zip", ".png": "image/png", ".geojson": "application/geo+json"}
_LAYER_ORDER = ("addresses", "parcels", "buildings", "centerlines")


@dataclass(frozen=True)
class Collection:
    """A current zip as the pages list it."""

    name: str
    region: str
    layer: str
    share_alike: bool
    size_bytes: int
    feature_count: int
    source_count: int
    built_at: datetime
    storage_key: str

    @property
    def url(self) -> str:
        """The stable address (redirects to the current file)."""
        return f"/latest/collection/{self.name}"

    @property
    def file_url(self) -> str:
        return "/" + self.storage_key

    def as_json(self, base_url: str) -> dict[str, Any]:
        return {"url": base_url + self.url, "region": self.region, "layer": self.layer,
                "share_alike": self.share_alike, "size_bytes": self.size_bytes,
                "count": self.feature_count, "sources": self.source_count,
                "built_at": self.built_at.isoformat()}


async def current_collections(app: web.Application) -> list[Collection]:
    """The current zips, by region (in the order of shared.regions), layer, free first."""
    rows = await CURRENT_COLLECTIONS.fetch(app[POOL])
    found = [Collection(row["name"], row["region"], row["layer"], row["share_alike"],
                        row["size_bytes"], row["feature_count"], row["source_count"],
                        row["built_at"], row["storage_key"]) for row in rows]
    order = {region: index for index, region in enumerate(REGIONS)}
    return sorted(found, key=lambda c: (order.get(c.region, len(order)),
                                        _LAYER_ORDER.index(c.layer), c.share_alike))


async def current_maps(app: web.Application) -> dict[str, Any] | None:
    """The newest coverage maps: their addresses, counts and when they were drawn."""
    row = await CURRENT_MAPS.fetchrow(app[POOL])
    if row is None:
        return None
    return {"urls": {name: f"/coverage/{name}" for name in MAP_FILES if name in row["files"]},
            "counts": row["counts"], "drawn_at": row["drawn_at"]}


async def downloads_page(request: web.Request) -> web.Response:
    return page(request, "downloads.html", title="Downloads",
                collections=await current_collections(request.app),
                maps=await current_maps(request.app))


async def latest_collection(request: web.Request) -> web.Response:
    """To the current file of a collection, by the same address whatever build made it."""
    name = request.match_info["name"]
    for collection in await current_collections(request.app):
        if collection.name == name:
            raise web.HTTPFound(collection.file_url)
    raise web.HTTPNotFound(text=f"There is no collection {name!r}; /downloads lists them.")


async def collection_file(request: web.Request) -> web.StreamResponse:
    """One built zip, streamed from storage (only keys the collections table lists)."""
    key = f"collections/{request.match_info['stamp']}/{request.match_info['name']}"
    keys = {row["storage_key"] for row in await COLLECTION_FILES.fetch(request.app[POOL])}
    if key not in keys:
        raise web.HTTPNotFound(text="No such collection file; /downloads lists the current ones.")
    return await _stream(request, key, request.match_info["name"])


async def coverage_file(request: web.Request) -> web.StreamResponse:
    """A file of the newest coverage maps."""
    name = request.match_info["name"]
    row = await CURRENT_MAPS.fetchrow(request.app[POOL])
    if row is None or name not in row["files"]:
        raise web.HTTPNotFound(text="No coverage maps have been drawn yet.")
    return await _stream(request, row["files"][name], name)


async def _stream(request: web.Request, key: str, name: str) -> web.StreamResponse:
    content_type = _TYPES.get(name[name.rfind("."):], "application/octet-stream")
    headers = {"Content-Type": content_type}
    if content_type != "image/png":
        headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return await stream_object(request, key, headers,
                               missing=f"{name} is missing from storage.")

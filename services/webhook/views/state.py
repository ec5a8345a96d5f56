"""The machine-readable files of the reference's site: ``/state.txt`` and ``/index.json``.

``state.txt`` is tab-separated (Excel's tab dialect, as the reference wrote it), one row per
current entry (migration 0007: ``site_current_since``), from that entry's latest published run.
Its first sixteen columns are the reference's, in its order and with its names, so that the
scripts reading it keep working; then ours. Where the reference wrote an S3 URL (``cache``,
``sample``, ``processed``, ``output``) we write this site's address of the file; booleans are
``true``/``false`` as the reference's were; times are seconds (README, "Outputs of a run").
We have no ``process hash``: that column is empty.
"""

from __future__ import annotations

import csv
import hashlib
import io
from email.utils import formatdate
from typing import Any
from urllib.parse import quote

from aiohttp import web

from services.webhook.keys import POOL, SETTINGS, SITE_CACHE
from services.webhook.views.downloads import current_collections, current_maps
from services.webhook.views.sets import SET_NEWEST_FINISHED
from services.webhook.views.sql import query

#: The reference Machine's state.txt columns (openaddr/ci/webapi.py, CSV_HEADER), in order.
REFERENCE_COLUMNS = (
    "source", "cache", "sample", "geometry type", "address count", "version", "fingerprint",
    "cache time", "processed", "process time", "process hash", "output",
    "attribution required", "attribution name", "share-alike", "code version",
)
#: Ours, after them: index.json's names where it has the value.
OUR_COLUMNS = (
    "source problem", "layer", "name", "run id", "status", "feature count", "processed at",
    "preview", "website", "license",
)
COLUMNS = REFERENCE_COLUMNS + OUR_COLUMNS
#: Columns that name a file of the run: written as its address on this site.
FILE_COLUMNS = frozenset({"cache", "sample", "processed", "output", "preview"})
#: Values of the run's index.json, as text (->> gives JSON's true/false and numbers as written).
_STATE_KEYS = tuple(column for column in COLUMNS
                    if column not in ("source", "layer", "name", "run id", "status",
                                      "source problem"))

_STATE_SELECT = ", ".join(f"r.state->>'{key}' AS \"{key}\"" for key in _STATE_KEYS)

STATE_ROWS = query("state.rows", f"""
    SELECT e.source_path, e.layer, e.entry_name, r.id, r.status, r.source_problem,
           {_STATE_SELECT}
    FROM entries e JOIN runs r ON r.id = e.run_id
    WHERE e.finished_at >= (SELECT site_current_since())
    ORDER BY e.source_path, e.layer, e.entry_name
""")


def _relative(source_path: str) -> str:
    # The reference wrote os.path.relpath(source_path, 'sources'): us/ca/alameda.json.
    return source_path.removeprefix("sources/")


def state_row(row: Any, base_url: str) -> list[str]:
    values: dict[str, Any] = {key: row[key] for key in _STATE_KEYS}
    values.update({
        "source": _relative(row["source_path"]), "layer": row["layer"],
        "name": row["entry_name"], "run id": row["id"], "status": row["status"],
        "source problem": row["source_problem"],
    })
    for column in FILE_COLUMNS:
        if values.get(column):
            values[column] = f"{base_url}/runs/{row['id']}/{quote(values[column], safe='')}"
    return ["" if values.get(column) is None else str(values[column]) for column in COLUMNS]


async def build_state_txt(app: web.Application) -> tuple[bytes, str]:
    """The file and its ETag (hashed once per build: the file is megabytes)."""
    base_url = app[SETTINGS].public_base_url.rstrip("/")
    rows = await STATE_ROWS.fetch(app[POOL])
    buffer = io.StringIO()
    writer = csv.writer(buffer, dialect="excel-tab")
    writer.writerow(COLUMNS)
    writer.writerows(state_row(row, base_url) for row in rows)
    body = buffer.getvalue().encode()
    return body, '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


async def state_txt(request: web.Request) -> web.Response:
    (body, etag), built_at = await request.app[SITE_CACHE].state_txt.get(
        lambda: build_state_txt(request.app))
    headers = {"ETag": etag, "Last-Modified": formatdate(built_at, usegmt=True),
               "Cache-Control": "public, max-age=10"}
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type="text/plain", charset="utf-8",
                        headers=headers)


async def index_json(request: web.Request) -> web.Response:
    """Where everything machine-readable is (the reference's keys first)."""
    base = request.app[SETTINGS].public_base_url.rstrip("/")
    set_id = await SET_NEWEST_FINISHED.fetchval(request.app[POOL])
    collections = {c.name: c.as_json(base) for c in await current_collections(request.app)}
    maps = await current_maps(request.app)
    return web.json_response({
        "run_states_url": f"{base}/state.txt",
        "latest_run_processed_url": f"{base}/latest/run/{{source}}/{{layer}}/{{entry}}.zip",
        "latest_set_url": f"{base}/sets/{set_id}" if set_id is not None else None,
        "collections": collections,
        "coverage": {name: base + url for name, url in maps["urls"].items()} if maps else {},
        "downloads_url": f"{base}/downloads",
        "api_url": f"{base}/api/",
        "openapi_url": f"{base}/api/openapi.json",
        "sources_url": f"{base}/api/sources",
    })

"""A run's files (``/runs/{id}/{name}``, streamed from storage with a safe type and a
``Content-Disposition``) and the stable download links
``/latest/run/{source}/{layer}/{entry}.{zip,csv,geojson}`` (to the newest good output)."""

from __future__ import annotations

from urllib.parse import unquote

from aiohttp import web

from services.webhook.keys import POOL, STORAGE
from services.webhook.views.headers import disposition, file_type
from services.webhook.views.params import integer_id, path_text
from services.webhook.views.sources import LATEST_FILES, path_of
from services.webhook.views.sql import query
from shared.errors import NotFound

RUN_OUTPUTS = query("files.outputs", "SELECT outputs FROM runs WHERE id = $1", "run_id")
LATEST_GOOD = query("files.latest", """
    SELECT e.good_run_id, g.outputs
    FROM entries e JOIN runs g ON g.id = e.good_run_id
    WHERE e.source_path = $1 AND e.layer = $2 AND e.entry_name = $3
""", "source_path", "layer", "entry_name")


async def run_file(request: web.Request) -> web.StreamResponse:
    """One output file of a run, streamed from storage."""
    run_id = integer_id(request, "run_id")
    name = request.match_info["name"]
    outputs = await RUN_OUTPUTS.fetchval(request.app[POOL], run_id)
    if not outputs or name not in outputs:
        raise web.HTTPNotFound(text=f"Run {run_id} has no output {name!r}.")
    kind = file_type(name)
    return await stream_object(request, outputs[name], {
        "Content-Type": kind.content_type,
        "Content-Disposition": disposition(run_id, name, kind),
    }, missing=f"Run {run_id}: {name} is missing from storage.")


async def stream_object(request: web.Request, key: str, headers: dict[str, str], *,
                        missing: str) -> web.StreamResponse:
    """A storage object streamed as the answer, with ``headers``; a 404 saying ``missing`` when
    the object is gone (found before anything is sent, so the 404 is a whole page)."""
    try:
        chunks = request.app[STORAGE].stream(key)
        first = await anext(chunks, b"")
    except NotFound as exc:
        raise web.HTTPNotFound(text=missing) from exc
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    await response.write(first)
    async for chunk in chunks:
        await response.write(chunk)
    await response.write_eof()
    return response


async def latest_run_file(request: web.Request) -> web.Response:
    """To the newest good output of an entry, by the same address whatever run made it."""
    # The raw path, split before decoding: an entry's name may hold an encoded "/".
    raw = request.raw_path.split("?", 1)[0].removeprefix("/latest/run/")
    stem, dot, extension = raw.rpartition(".")
    parts = stem.split("/")
    if not dot or extension not in LATEST_FILES or len(parts) < 3:
        raise web.HTTPNotFound(text="Latest downloads are /latest/run/{source}/{layer}/"
                                    "{entry}.zip (or .csv, .geojson).")
    name = "/".join(unquote(part) for part in parts[:-2])
    layer, entry = unquote(parts[-2]), unquote(parts[-1])
    for part in (name, layer, entry):
        path_text(part, "There is no entry by that name.")
    row = await LATEST_GOOD.fetchrow(request.app[POOL], path_of(name), layer, entry)
    wanted = LATEST_FILES[extension]
    if row is None or wanted not in (row["outputs"] or {}):
        raise web.HTTPNotFound(text=f"{name} has no good {layer} run of {entry!r} with "
                                    f"{wanted}.")
    raise web.HTTPFound(f"/runs/{row['good_run_id']}/{wanted}")

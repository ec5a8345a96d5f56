"""A run's page (``/runs/{id}``): its state, problem and message, log, sample, preview, outputs,
the source entry exactly as it was run, timings, and the earlier runs of the same entry."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from services.webhook.keys import POOL, SETTINGS, STORAGE
from services.webhook.views import github
from services.webhook.views.models import Run, RunDetail, source_name
from services.webhook.views.params import integer_id
from services.webhook.views.render import page
from services.webhook.views.sql import RUN_COLUMNS, query
from shared.errors import NotFound, StorageError
from shared.sources import SourceError, get_entry

RUN_ONE = query("runs.one", f"""
    SELECT {RUN_COLUMNS}, r.error AS full_error, r.commit_sha, r.source, r.state, r.queued_at,
           r.retries, j.repo, j.head_repo
    FROM runs r LEFT JOIN jobs j ON j.id = r.job_id
    WHERE r.id = $1
""", "run_id")
#: Served by the index on (source_path, layer, entry_name, finished_at DESC).
RUN_EARLIER = query("runs.earlier", f"""
    SELECT {RUN_COLUMNS} FROM runs r
    WHERE r.source_path = $1 AND r.layer = $2 AND r.entry_name = $3 AND r.finished_at < $4
    ORDER BY r.finished_at DESC LIMIT 20
""", "source_path", "layer", "entry_name", "finished_before")

#: The end of a log shown on the page (the whole log is a link away).
LOG_TAIL_BYTES = 128 * 1024
#: A sample larger than this is not drawn as a table.
SAMPLE_MAX_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Log:
    text: str
    #: Bytes left out before ``text``.
    skipped_bytes: int


def entry_of(source: Any, layer: str, name: str) -> dict[str, Any] | None:
    """The entry as it was run, from the source document the run was given."""
    if not isinstance(source, dict):
        return None
    try:
        return get_entry(source, layer, name)
    except SourceError:
        return None


async def run_detail(app: web.Application, run_id: int) -> tuple[RunDetail, Any]:
    """The run and its database row (the page needs the job's repository too)."""
    pool = app[POOL]
    row = await RUN_ONE.fetchrow(pool, run_id)
    if row is None:
        raise web.HTTPNotFound(text=f"There is no run {run_id}.")
    now = datetime.now(UTC)
    earlier_than = row["finished_at"] or datetime.max.replace(tzinfo=UTC)
    earlier = await RUN_EARLIER.fetch(pool, row["source_path"], row["layer"],
                                      row["entry_name"], earlier_than)
    base = Run.of(row, now).model_dump()
    base["error"] = row["full_error"]
    detail = RunDetail(
        **base, commit_sha=row["commit_sha"],
        entry=entry_of(row["source"], row["layer"], row["entry_name"]),
        index=row["state"] or {}, queued_at=row["queued_at"], retries=row["retries"],
        earlier=[Run.of(other, now) for other in earlier],
    )
    return detail, row


async def run_page(request: web.Request) -> web.Response:
    run, row = await run_detail(request.app, integer_id(request, "run_id"))
    log = await _log(request.app, run)
    sample = await _sample(request.app, run)
    base = github.web_base(request.app[SETTINGS])
    repo = row["head_repo"] or row["repo"]
    source_file = github.file_url(base, repo, run.commit_sha, run.source_path) if repo else None
    refresh = {"Refresh": "10"} if run.status is None else None
    return page(
        request, "run.html", title=f"Run {run.id}", run=run, log=log, sample=sample,
        entry_json=json.dumps(run.entry, indent=2, ensure_ascii=False) if run.entry else None,
        index_json=json.dumps(run.index, indent=2, ensure_ascii=False, sort_keys=True),
        source_file=source_file, name=source_name(run.source_path), headers=refresh,
        timings=_timings(run),
    )


def _timings(run: RunDetail) -> list[tuple[str, Any]]:
    """What the page lists under "Timings": moments, then lengths in seconds."""
    index = run.index
    return [
        ("created", run.created_at), ("queued", run.queued_at), ("started", run.started_at),
        ("finished", run.finished_at), ("duration_s", run.duration_s),
        ("cache_time_s", _seconds(index.get("cache time"))),
        ("process_time_s", _seconds(index.get("process time"))),
    ]


def _seconds(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


async def _log(app: web.Application, run: RunDetail) -> Log | None:
    """The end of ``output.txt``; while the run is in progress, whatever of it is stored."""
    key = run.outputs.get("output.txt") or (
        f"runs/{run.id}/output.txt" if run.status is None else None)
    if key is None:
        return None
    chunks: list[bytes] = []
    kept = total = 0
    try:
        async for chunk in app[STORAGE].stream(key):
            chunks.append(chunk)
            kept += len(chunk)
            total += len(chunk)
            while chunks and kept - len(chunks[0]) >= LOG_TAIL_BYTES:
                kept -= len(chunks.pop(0))
    except (NotFound, StorageError):
        return None
    tail = b"".join(chunks)[-LOG_TAIL_BYTES:]
    return Log(tail.decode("utf-8", errors="replace"), total - len(tail))


async def _sample(app: web.Application, run: RunDetail) -> list[list[str]] | None:
    """``sample.json`` as rows of text: the header, then the first records."""
    key = run.outputs.get("sample.json")
    if key is None:
        return None
    try:
        data = await app[STORAGE].get_bytes(key)
    except (NotFound, StorageError):
        return None
    if len(data) > SAMPLE_MAX_BYTES:
        return None
    try:
        rows = json.loads(data)
    except ValueError:
        return None
    if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
        return None
    return [["" if cell is None else str(cell) for cell in row] for row in rows]

"""HTTP routes of the webhook service.

``POST /hook`` answers GitHub: 401 for a missing or wrong signature (nothing is read further),
400 for a body that is not the JSON we need (the reason is in the answer), 202 for events we
do not act on, 200/201 for pushes. Pages and the JSON API read the database only.
"""

from __future__ import annotations

import json
import mimetypes
from typing import Any

import pydantic
from aiohttp import web

from services.webhook.events import PushEvent
from services.webhook.intake import take_push
from services.webhook.keys import BROKER, GITHUB, POOL, SETTINGS, STORAGE, TEMPLATES
from services.webhook.signature import verify_signature
from shared.errors import GitHubError, NotFound
from shared.jobs import job_url
from shared.logging import get_logger

log = get_logger(__name__)


def add_routes(app: web.Application) -> None:
    """Register every route of the service."""
    app.router.add_post("/hook", hook)
    app.router.add_get("/health", health)
    app.router.add_get("/jobs/{job_id:\\d+}", job_page)
    app.router.add_get("/api/jobs/{job_id:\\d+}", job_json)
    app.router.add_get("/runs/{run_id:\\d+}/{name}", run_file)


async def health(request: web.Request) -> web.Response:
    """Liveness and readiness: the database answers."""
    try:
        await request.app[POOL].fetchval("SELECT 1")
    except Exception as exc:  # any failure means "not ready"; the reason goes in the answer
        return web.json_response({"status": "unavailable", "error": str(exc)}, status=503)
    return web.json_response({"status": "ok"})


async def hook(request: web.Request) -> web.Response:
    """Receive one GitHub delivery."""
    settings = request.app[SETTINGS]
    body = await request.read()
    secrets = [secret.get_secret_value() for secret in settings.webhook_secrets]
    if not verify_signature(body, request.headers.get("X-Hub-Signature-256"), secrets):
        log.warning("hook.unauthorized", delivery=request.headers.get("X-GitHub-Delivery"))
        return web.json_response({"error": "missing or invalid signature"}, status=401)

    event = request.headers.get("X-GitHub-Event", "")
    delivery = request.headers.get("X-GitHub-Delivery", "")
    if event == "ping":
        return web.json_response({"pong": True})
    if event != "push":
        return web.json_response({"ignored": f"event {event!r} is not handled"}, status=202)
    if not delivery:
        return web.json_response({"error": "X-GitHub-Delivery header is missing"}, status=400)
    try:
        push = PushEvent.model_validate(json.loads(body))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        # json.loads decodes bytes itself: invalid UTF-8 is not JSON either, not a 500.
        return web.json_response({"error": f"body is not JSON: {exc}"}, status=400)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return web.json_response({"error": f"push payload: {where}: {first['msg']}"}, status=400)

    if push.is_deletion:
        return web.json_response({"ignored": "branch deletion"}, status=202)
    if push.branch is None:
        return web.json_response({"ignored": f"{push.ref} is not a branch"}, status=202)
    try:
        result = await take_push(
            push, delivery, pool=request.app[POOL], broker=request.app[BROKER],
            github=request.app[GITHUB], settings=settings,
        )
    except GitHubError as exc:
        # Nothing was created: GitHub (or a maintainer) can redeliver once GitHub answers.
        log.error("hook.github_failed", delivery=delivery, error=str(exc))
        return web.json_response({"error": f"could not read sources: {exc}"}, status=502)
    answer: dict[str, Any] = {"job": result.job_id, "runs": result.runs}
    if result.job_id is not None:
        answer["url"] = job_url(settings.public_base_url, result.job_id)
    if result.reason:
        answer["reason"] = result.reason
    if result.duplicate:
        answer["duplicate"] = True
    return web.json_response(answer, status=201 if result.job_id and not result.duplicate else 200)


async def _load_job(request: web.Request) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    job_id = int(request.match_info["job_id"])
    pool = request.app[POOL]
    job = await pool.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
    if job is None:
        raise web.HTTPNotFound(text=f"no job {job_id}")
    runs = await pool.fetch(
        """
        SELECT id, source_path, layer, entry_name, status, source_problem, error, attempt,
               worker, created_at, started_at, finished_at, outputs, state
        FROM runs WHERE job_id = $1 ORDER BY id
        """,
        job_id,
    )
    return dict(job), [dict(run) for run in runs]


async def job_page(request: web.Request) -> web.Response:
    """A job and its runs, for people."""
    job, runs = await _load_job(request)
    template = request.app[TEMPLATES].get_template("job.html")
    html = template.render(job=job, runs=runs)
    return web.Response(text=html, content_type="text/html")


async def job_json(request: web.Request) -> web.Response:
    """A job and its runs, for programs."""
    job, runs = await _load_job(request)
    return web.json_response({"job": job, "runs": runs}, dumps=_dumps)


async def run_file(request: web.Request) -> web.StreamResponse:
    """One output file of a run, streamed from storage."""
    run_id = int(request.match_info["run_id"])
    name = request.match_info["name"]
    outputs = await request.app[POOL].fetchval("SELECT outputs FROM runs WHERE id = $1", run_id)
    if not outputs or name not in outputs:
        raise web.HTTPNotFound(text=f"run {run_id} has no output {name!r}")
    storage = request.app[STORAGE]
    response = web.StreamResponse()
    response.content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    try:
        chunks = storage.stream(outputs[name])
        first = await anext(chunks, b"")
    except NotFound as exc:
        raise web.HTTPNotFound(text=f"run {run_id}: {name} is missing from storage") from exc
    await response.prepare(request)
    await response.write(first)
    async for chunk in chunks:
        await response.write(chunk)
    await response.write_eof()
    return response


@web.middleware
async def error_pages(request: web.Request, handler: Any) -> web.StreamResponse:
    """Unexpected errors become a 500 with a short reason and a log event, never a traceback."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException:
        raise
    except Exception:
        log.exception("http.error", path=request.path)
        return web.json_response({"error": "internal error"}, status=500)


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str)

"""HTTP routes of the webhook service.

``POST /hook`` answers GitHub: 401 for a missing or wrong signature, 413 for a body over the
limit, 400 for a body that is not the JSON we need (the reason is in the answer), 202 for
events and actions we do not act on (nothing stored), 202 for a delivery stored to be made
into a job (``deliveries.py``; the answer names ``/api/deliveries/{id}``, which tells what
became of it), 503 while PostgreSQL is down (nothing is stored; the delivery can be
redelivered). A body is read only once the request carries a signature header, and at most
:data:`BODY_BUDGET_BYTES` of unverified bodies are read at once (the others wait their turn, or
get a 503 after :data:`BODY_WAIT_S`; ``budget.py``), so a flood of unsigned 25 MB posts cannot
exhaust the service's memory. The site's pages, files and JSON API are in ``views/``
(``views/site.py`` lists them); they read the database and storage only.

``/metrics``, ``/health/live`` and ``/health/ready`` are the probes every service has
(:mod:`shared.probes`); ``/health`` is the readiness probe under its older name.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import asyncpg
import pydantic
from aiohttp import web

from services.webhook.deliveries import delivery_url, store_delivery
from services.webhook.events import IssueCommentEvent, PullRequestEvent, PushEvent
from services.webhook.keys import BODY_BUDGET, POOL, PROCESSOR, SETTINGS
from services.webhook.signature import SignatureCheck
from services.webhook.views.params import path_text
from services.webhook.views.render import error_page
from services.webhook.views.site import add_site_routes
from shared import metrics
from shared.jobs import job_url
from shared.logging import get_logger
from shared.outage import is_outage

log = get_logger(__name__)


#: GitHub caps webhook payloads at 25 MB.
MAX_BODY_BYTES = 25 * 1024 * 1024 + 1024
#: Bytes of unverified request bodies read at once: four of the largest GitHub sends.
BODY_BUDGET_BYTES = 4 * MAX_BODY_BYTES
#: How long a delivery waits for room in the budget before it gets a 503.
BODY_WAIT_S = 30.0
_CHUNK_BYTES = 64 * 1024


def add_routes(app: web.Application) -> None:
    """Register every route of the service: the hook and its deliveries here, the site's
    pages, files and API in ``views/``."""
    app.router.add_post("/hook", hook)
    app.router.add_get("/health", health)
    app.router.add_get("/api/deliveries/{delivery_id}", delivery_json)
    add_site_routes(app)


async def health(request: web.Request) -> web.Response:
    """Readiness under its older name: the database answers."""
    try:
        await request.app[POOL].fetchval("SELECT 1")
    except Exception as exc:  # any failure means "not ready"; the reason goes in the answer
        return web.json_response({"status": "unavailable", "error": str(exc)}, status=503)
    return web.json_response({"status": "ok"})


async def hook(request: web.Request) -> web.Response:
    """Receive one GitHub delivery."""
    event = request.headers.get("X-GitHub-Event", "")
    response = await _hook(request, event)
    metrics.DELIVERIES.labels(event if event in _COUNTED_EVENTS else "other",
                              str(response.status)).inc()
    return response


_COUNTED_EVENTS = frozenset({"push", "ping", "pull_request", "issue_comment"})


async def _read_signed_body(request: web.Request) -> bytes | web.Response:
    """The body if its signature is good; else the answer to give."""
    settings = request.app[SETTINGS]
    delivery = request.headers.get("X-GitHub-Delivery")
    signature = request.headers.get("X-Hub-Signature-256")
    if not signature:
        log.warning("hook.unauthorized", delivery=delivery, reason="no signature header")
        return web.json_response({"error": "missing or invalid signature"}, status=401)
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        return web.json_response({"error": "body too large"}, status=413)
    budget = request.app[BODY_BUDGET]
    reserved = request.content_length if request.content_length is not None else MAX_BODY_BYTES
    try:
        await asyncio.wait_for(budget.acquire(reserved), BODY_WAIT_S)
    except TimeoutError:
        log.warning("hook.busy", delivery=delivery)
        return web.json_response({"error": "too many deliveries at once, try again"},
                                 status=503, headers={"Retry-After": "10"})
    try:
        # Checked as it arrives, in small chunks kept in a list: a body that turns out to be
        # unsigned is dropped without ever having been copied into one large buffer (large
        # growing buffers fragment the heap and keep the process's memory high afterwards).
        check = SignatureCheck([secret.get_secret_value() for secret in settings.webhook_secrets])
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_chunked(_CHUNK_BYTES):
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                return web.json_response({"error": "body too large"}, status=413)
            check.update(chunk)
            chunks.append(chunk)
        if not check.matches(signature):
            log.warning("hook.unauthorized", delivery=delivery, reason="wrong signature")
            return web.json_response({"error": "missing or invalid signature"}, status=401)
    finally:
        await budget.release(reserved)
    return b"".join(chunks)


#: What each event we act on is validated as at the door.
_EVENT_MODELS: dict[str, type[pydantic.BaseModel]] = {
    "push": PushEvent, "pull_request": PullRequestEvent, "issue_comment": IssueCommentEvent,
}


async def _hook(request: web.Request, event: str) -> web.Response:
    settings = request.app[SETTINGS]
    body = await _read_signed_body(request)
    if isinstance(body, web.Response):
        return body
    delivery = request.headers.get("X-GitHub-Delivery", "")
    if event == "ping":
        return web.json_response({"pong": True})
    model = _EVENT_MODELS.get(event)
    if model is None:
        return web.json_response({"ignored": f"event {event!r} is not handled"}, status=202)
    if not delivery:
        return web.json_response({"error": "X-GitHub-Delivery header is missing"}, status=400)
    try:
        payload = json.loads(body)
        parsed = model.model_validate(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        # json.loads decodes bytes itself: invalid UTF-8 is not JSON either, not a 500.
        return web.json_response({"error": f"body is not JSON: {exc}"}, status=400)
    except RecursionError:
        return web.json_response({"error": "body is not JSON we accept: nested too deeply"},
                                 status=400)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return web.json_response(
            {"error": f"{event} payload: {where}: {first['msg']}"}, status=400
        )
    reason = _nothing_to_do(parsed)
    if reason is not None:
        log.info("hook.ignored", delivery=delivery, event_name=event, reason=reason)
        return web.json_response({"ignored": reason}, status=202)
    # The body as received (json.loads accepted it, so it is UTF-8 JSON): PostgreSQL parses it
    # once more rather than Python encoding the parsed payload again.
    try:
        stored = await store_delivery(request.app[POOL], delivery, event, body.decode())
    except asyncpg.exceptions.UntranslatableCharacterError as exc:
        # JSON may say \u0000; PostgreSQL's jsonb cannot hold it. GitHub never sends one.
        return web.json_response({"error": f"{event} payload cannot be stored: {exc}"},
                                 status=400)
    request.app[PROCESSOR].wake()
    answer: dict[str, Any] = {
        "delivery": delivery, "queued": True,
        "status_url": delivery_url(settings.public_base_url, delivery),
    }
    if stored.duplicate:
        answer["duplicate"] = True
    return web.json_response(answer, status=202)


def _nothing_to_do(parsed: pydantic.BaseModel) -> str | None:
    """Why a valid delivery asks for no job, or None when it does."""
    if isinstance(parsed, PushEvent):
        if parsed.is_deletion:
            return "branch deletion"
        if parsed.branch is None:
            return f"{parsed.ref} is not a branch"
    elif isinstance(parsed, PullRequestEvent):
        if not parsed.makes_a_job:
            return f"pull request {parsed.action}: no new commits to check"
    elif isinstance(parsed, IssueCommentEvent):
        if not parsed.asks_for_rerun:
            return "not a request to re-run a pull request"
        if not parsed.may_rerun:
            return (f"{parsed.comment.user.login} may not ask for a re-run "
                    "(the pull request's author or a member of the repository may)")
    return None


async def delivery_json(request: web.Request) -> web.Response:
    """What became of a delivery: waiting, a job, ignored, or an error with its reason."""
    delivery = path_text(request.match_info["delivery_id"], "There is no delivery by that id.")
    row = await request.app[POOL].fetchrow(
        """
        SELECT delivery_id, event, received_at, processed_at, attempts, outcome, job_id,
               last_error, next_try_at
        FROM deliveries WHERE delivery_id = $1
        """,
        delivery,
    )
    if row is None:
        raise web.HTTPNotFound(text=f"no delivery {delivery}")
    answer = dict(row)
    answer["state"] = row["outcome"] or "waiting"
    if row["job_id"] is not None:
        answer["job_url"] = job_url(request.app[SETTINGS].public_base_url, row["job_id"])
    return web.json_response(answer, dumps=_dumps)


@web.middleware
async def error_pages(request: web.Request, handler: Any) -> web.StreamResponse:
    """Unexpected errors become a 500 with a short reason and a log event, never a traceback;
    PostgreSQL or RabbitMQ being down becomes a 503 (try again later). A 400 or 404 (an unknown
    id, path or parameter) is a page of the site for people and ``{"error": ...}`` for programs
    (the API, the hook, the probes)."""
    started = time.perf_counter()
    status = 500
    try:
        response: web.StreamResponse = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        if status not in (400, 404):
            raise
        unmatched = request.match_info.route.resource is None
        message = f"There is no page at {request.path}." if unmatched else (exc.text or "")
        return _error(request, status, message)
    except Exception as exc:
        if is_outage(exc):
            status = 503
            log.warning("http.unavailable", path=request.path, error=repr(exc))
            return _error(request, 503, "a service we depend on is unavailable; try again later",
                          headers={"Retry-After": "30"})
        log.exception("http.error", path=request.path)
        return _error(request, 500, "internal error")
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        metrics.HTTP_LATENCY.labels(route, request.method, str(status)).observe(
            time.perf_counter() - started)


#: Paths whose errors are JSON whatever asks.
_PROGRAM_PATHS = ("/api/", "/hook", "/health", "/metrics", "/index.json", "/state.txt")


def _error(request: web.Request, status: int, message: str,
           headers: dict[str, str] | None = None) -> web.Response:
    if request.method == "GET" and not request.path.startswith(_PROGRAM_PATHS):
        try:
            return error_page(request, status, message)
        except Exception:  # a page that cannot render must still answer
            log.exception("http.error_page_failed", path=request.path)
    return web.json_response({"error": message}, status=status, headers=headers)


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str)

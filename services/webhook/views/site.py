"""The site's routes, in one list: pages, machine-readable files, the API, static assets."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from services.webhook.views import (
    api,
    demo,
    downloads,
    files,
    home,
    jobs,
    openapi,
    runs,
    sets,
    sources,
    state,
    workers,
)
from services.webhook.views.headers import secure
from services.webhook.views.render import page

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
#: Assets change only with a deploy: a day in caches.
STATIC_MAX_AGE_S = 86400
ROBOTS = ("User-Agent: *\nAllow: /\nAllow: /sources/\nDisallow: /runs/\nDisallow: /jobs/\n"
          "Disallow: /sets/\nDisallow: /latest/\nDisallow: /api/\n")


def add_site_routes(app: web.Application) -> None:
    """Register every page, file and API route, and the headers every answer carries."""
    add = app.router.add_get
    add("/", home.home_page)
    add("/jobs/", jobs.jobs_page)
    add("/jobs/{job_id:\\d+}", jobs.job_page)
    add("/runs/{run_id:\\d+}", runs.run_page)
    add("/runs/{run_id:\\d+}/{name}", files.run_file)
    add("/sources/", sources.sources_page)
    add("/sources/{name:.+}", sources.source_page)
    add("/sets/", sets.sets_page)
    add("/sets/{set_id:\\d+}", sets.set_page)
    add("/workers", workers.workers_page)
    add("/latest/set", sets.newest_finished_set)
    add("/latest/run/{tail:.+}", files.latest_run_file)
    add("/downloads", downloads.downloads_page)
    add("/latest/collection/{name}", downloads.latest_collection)
    add("/collections/{stamp}/{name}", downloads.collection_file)
    add("/coverage/{name}", downloads.coverage_file)
    add("/state.txt", state.state_txt)
    add("/index.json", state.index_json)
    add("/demo/github", demo.demo_github_page)
    add("/api/", api_page)
    add("/api/openapi.json", openapi.openapi_json)
    for endpoint in api.ENDPOINTS:
        add(endpoint.route, api.view(endpoint))
    # The addresses people type or keep from the reference's site.
    for old, new in (("/jobs", "/jobs/"), ("/sets", "/sets/"), ("/sources", "/sources/"),
                     ("/api", "/api/"), ("/workers/", "/workers")):
        add(old, _redirect(new))
    add("/sets/{set_id:\\d+}/", _set_with_slash)
    add("/robots.txt", robots)
    add("/favicon.ico", _redirect("/static/favicon.svg"))
    app.router.add_static("/static/", STATIC_DIR, append_version=False)
    app.on_response_prepare.append(secure)
    app.on_response_prepare.append(_static_caching)


async def api_page(request: web.Request) -> web.Response:
    """What the API offers, from the same declarations as its routes and document."""
    endpoints = [(openapi.openapi_path(endpoint.route), endpoint) for endpoint in api.ENDPOINTS]
    return page(request, "api.html", title="API", endpoints=endpoints)


async def robots(request: web.Request) -> web.Response:
    return web.Response(text=ROBOTS)


def _redirect(target: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        raise web.HTTPMovedPermanently(target)

    return handle


async def _set_with_slash(request: web.Request) -> web.StreamResponse:
    raise web.HTTPMovedPermanently(f"/sets/{request.match_info['set_id']}")


async def _static_caching(request: web.Request, response: web.StreamResponse) -> None:
    if request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", f"public, max-age={STATIC_MAX_AGE_S}")

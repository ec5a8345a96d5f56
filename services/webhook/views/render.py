"""Rendering the site's pages: one jinja2 environment (autoescaped, strict), one layout.

Every page extends ``templates/base.html`` (navigation, the stylesheet, the footer); views call
:func:`page` with the template's name and its values. Errors render ``error.html`` in the same
layout (:func:`error_page`), so an unknown id is a page of the site, not a bare 404.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from aiohttp import web

from services.webhook.keys import SETTINGS, TEMPLATES
from services.webhook.views import format as fmt
from services.webhook.views import tables

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"

#: The sections in the navigation bar: (path, label).
SECTIONS = (
    ("/", "Home"), ("/jobs/", "Jobs"), ("/sets/", "Sets"), ("/sources/", "Sources"),
    ("/workers", "Workers"), ("/api/", "API"),
)


def environment() -> jinja2.Environment:
    """The site's template environment: autoescape on (user-written text is never markup),
    undefined names are errors."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        # Templates change only with a deploy: no stat() of each file on every page.
        auto_reload=False,
    )
    env.filters.update(
        thousands=fmt.thousands, duration=fmt.duration, when=fmt.when, iso=fmt.iso,
        ago=fmt.ago, percent=fmt.percent, short_sha=fmt.short_sha, urlpart=_urlpart,
    )
    env.globals.update(
        sections=SECTIONS, DASH=fmt.DASH, with_query=with_query, run_rows=tables.run_rows,
        job_rows=tables.job_rows, set_rows=tables.set_rows, source_rows=tables.source_rows,
        entry_rows=tables.entry_rows, progress_bar=tables.progress,
    )
    return env


def _urlpart(value: str) -> str:
    return quote(value, safe="/")


def with_query(path: str, **values: Any) -> str:
    """``path`` with the non-empty ``values`` as its query string."""
    kept = {name: value for name, value in values.items() if value not in (None, "")}
    return f"{path}?{urlencode(kept)}" if kept else path


def page(request: web.Request, template: str, *, status: int = 200,
         headers: dict[str, str] | None = None, **context: Any) -> web.Response:
    """Render ``template`` in the site's layout."""
    html = request.app[TEMPLATES].get_template(template).render(
        path=request.path, demo=request.app[SETTINGS].demo_mode, **context)
    return web.Response(text=html, content_type="text/html", status=status, headers=headers)


def error_page(request: web.Request, status: int, message: str) -> web.Response:
    """An error as a page of the site: 404 for what is not there, 400 for a bad address."""
    titles = {400: "Bad request", 404: "Not found", 500: "Something went wrong",
              503: "Unavailable"}
    return page(request, "error.html", status=status, title=titles.get(status, "Error"),
                message=message)

"""``/demo/github`` (demo mode only): the commit statuses and pull-request comments the GitHub
stand-in received, so that a newcomer sees what GitHub would show.

The stand-in runs in the ``oa-machine up`` process and this service in another; the page asks
the stand-in over HTTP (``GITHUB_API_URL`` points at it in demo mode).
"""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web

from services.demo.github import RECEIVED_PATH
from services.webhook.keys import SETTINGS
from services.webhook.views.render import page

ASK_TIMEOUT_S = 3.0


async def demo_github_page(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    if not settings.demo_mode:
        raise web.HTTPNotFound(text="This is not a demo: the statuses are on GitHub.")
    received: dict[str, Any] | None = None
    problem = None
    url = settings.github_api_url.rstrip("/") + RECEIVED_PATH
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ASK_TIMEOUT_S)) \
                as session, session.get(url) as response:
            response.raise_for_status()
            received = await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        problem = f"The GitHub stand-in at {settings.github_api_url} did not answer ({exc})."
    statuses = list(reversed((received or {}).get("statuses", [])))
    comments = (received or {}).get("comments", [])
    return page(request, "demo_github.html", title="GitHub (demo)", statuses=statuses,
                comments=comments, problem=problem, stand_in=settings.github_api_url)

"""The site in a real headless Chromium: every page of the seeded world opens without a console
error (a CSP violation, a failed asset, a script error are all errors), fits a phone's width,
and no same-origin link on any page leads to a 404 or a server error. Screenshots of each page
(desktop and phone) are saved as test artifacts: in ``$OA_SCREENSHOT_DIR`` when set, else in
the test's ``tmp_path``.

Pages reached by links are opened in the browser too (a crawl from the pages listed here);
links to files and JSON are fetched over HTTP, as a browser would download them.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag, urlsplit

import pytest
from aiohttp.test_utils import TestClient

from tests.support.browser import CHROMIUM, Browser, browser
from tests.webhook.site_data import World

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed")

Client = TestClient[Any, Any]
PHONE = {"width": 390, "height": 844, "mobile": True}
#: The crawl opens at most this many pages in the browser (the world has about 60).
MAX_PAGES = 120


def _artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("OA_SCREENSHOT_DIR") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _slug(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", path).strip("-") or "home"


async def _fits(driven: Browser) -> tuple[int, int]:
    found = await driven.call("Runtime.evaluate", {"returnByValue": True, "expression": (
        "[document.documentElement.scrollWidth, window.innerWidth]")})
    width, inner = found["result"]["value"]
    return int(width), int(inner)


async def test_every_page_in_a_browser(site: Client, site_world: World, tmp_path: Path) -> None:
    started = time.monotonic()
    world = site_world
    base = str(site.make_url("/")).rstrip("/")
    shots = _artifacts(tmp_path)
    seeds = ["/", "/jobs/", *(f"/jobs/{job_id}" for job_id in world.jobs.values()),
             f"/runs/{world.runs['set_good']}", f"/runs/{world.runs['set_failed']}",
             f"/runs/{world.runs['set_running']}", "/sources/", "/sources/us/ks/lane",
             "/sources/zz/xss", "/sets/", f"/sets/{world.sets['open']}", "/workers", "/api/",
             "/demo/github", "/no/such/page"]
    problems: list[str] = []
    opened: dict[str, list[str]] = {}
    fetched: dict[str, int] = {}
    async with browser() as driven:
        # Each listed page at a phone's width: no error, nothing wider than the screen.
        for path in seeds:
            visit = await driven.visit(base + path, **PHONE)
            expected = 404 if path == "/no/such/page" else 200
            if visit.status != expected:
                problems.append(f"{path} (phone): HTTP {visit.status}")
            problems.extend(f"{path} (phone): {error}" for error in visit.errors
                            if expected == 200 or "404" not in error)
            width, inner = await _fits(driven)
            if width > inner:
                problems.append(f"{path} (phone): {width} px wide on a {inner} px screen")
            await driven.screenshot(shots / f"phone-{_slug(path)}.png")

        # The crawl at a desktop's width, from the listed pages through every same-origin link.
        queue = list(seeds)
        while queue and len(opened) < MAX_PAGES:
            path = queue.pop(0)
            if path in opened:
                continue
            visit = await driven.visit(base + path)
            opened[path] = visit.links
            expected = 404 if path == "/no/such/page" else 200
            if visit.status != expected:
                problems.append(f"{path}: HTTP {visit.status}")
            problems.extend(f"{path}: {error}" for error in visit.errors
                            if expected == 200 or "404" not in error)
            if path in seeds:
                await driven.screenshot(shots / f"desktop-{_slug(path)}.png")
            for link in visit.links:
                target = urldefrag(link).url
                if not target.startswith(base + "/"):
                    problems.append(f"{path}: a link leaves the site: {link}")
                    continue
                relative = target[len(base):]
                if relative in opened or relative in fetched or relative in queue:
                    continue
                # Pages are opened in the browser; files, JSON and redirects are fetched.
                response = await site.get(relative)
                fetched[relative] = response.status
                await response.read()
                if response.status >= 400:
                    problems.append(f"{path}: link {relative}: HTTP {response.status}")
                elif response.content_type == "text/html":
                    final = urlsplit(str(response.url))
                    queue.append(final.path + (f"?{final.query}" if final.query else ""))
    assert not problems, "\n".join(problems)
    # The crawl reached the whole world, and every kind of page and file.
    every = set(opened) | set(fetched)
    assert len(opened) >= 40, sorted(opened)
    for run_id in world.runs.values():
        assert f"/runs/{run_id}" in every, run_id
    assert f"/runs/{world.runs['set_good']}/processed.zip" in every
    assert "/state.txt" in every and "/api/openapi.json" in every
    assert any(path.startswith("/latest/run/") for path in every)
    assert len(list(shots.glob("*.png"))) >= 2 * len(seeds)
    assert time.monotonic() - started < 90

"""The home page (``/``): the totals (sources, addresses in the latest good runs, runs today),
the latest set's progress and success rate, the schedule, the recent jobs, the collections, and
where everything else is. Its figures are kept for a few seconds (``cache.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from services.webhook.keys import POOL, SITE_CACHE
from services.webhook.views.downloads import Collection, current_collections
from services.webhook.views.jobs import list_jobs
from services.webhook.views.models import Home, JobsQuery, Schedule
from services.webhook.views.render import page
from services.webhook.views.schedule import schedule
from services.webhook.views.sets import latest_set
from services.webhook.views.sql import query

#: The entries table holds a row per entry (thousands), not per run.
HOME_TOTALS = query("home.totals", """
    SELECT count(DISTINCT source_path) AS sources, count(*) AS entries,
           coalesce(sum(addresses), 0)::bigint AS addresses
    FROM entries WHERE finished_at >= (SELECT site_current_since())
""")
HOME_RUNS_TODAY = query("home.runs_today", """
    SELECT count(*) FROM runs WHERE finished_at >= date_trunc('day', now(), 'UTC')
""")
RECENT_JOBS = 10


@dataclass(frozen=True)
class HomePage:
    """Everything ``/`` shows."""

    figures: Home
    schedule: Schedule
    collections: list[Collection]


async def figures(app: web.Application) -> Home:
    """The home page's figures, counted now."""
    pool = app[POOL]
    totals = await HOME_TOTALS.fetchrow(pool)
    runs_today = await HOME_RUNS_TODAY.fetchval(pool)
    jobs = await list_jobs(app, JobsQuery(limit=RECENT_JOBS), "/jobs/")
    return Home(sources=totals["sources"], entries=totals["entries"],
                addresses=totals["addresses"], runs_today=runs_today,
                latest_set=await latest_set(app), recent_jobs=jobs.items)


async def _build(app: web.Application) -> HomePage:
    return HomePage(await figures(app), await schedule(app), await current_collections(app))


async def home(app: web.Application) -> HomePage:
    """What the home page shows, at most ``cache.HOME_MAX_AGE_S`` old."""
    kept, _built_at = await app[SITE_CACHE].home.get(lambda: _build(app))
    assert isinstance(kept, HomePage)
    return kept


async def home_page(request: web.Request) -> web.Response:
    shown = await home(request.app)
    return page(request, "home.html", title="OpenAddresses Machine", home=shown.figures,
                schedule=shown.schedule, collections=shown.collections)

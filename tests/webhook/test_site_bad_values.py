"""Values PostgreSQL cannot take for their columns, in the site's addresses: a number past
bigint (ids, cursors) or integer (pull request numbers), text with a NUL character. A query
value is a 400 naming the parameter, a path part a 404: a page of the site for pages,
``{"error": ...}`` for the API; never a 500. (The API's answers are also checked against its
document in ``test_site_api.py``.) And ``/api/workers`` pages by name like the other lists.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient

from tests.webhook.site_data import World
from tests.webhook.test_site_routes import html, json_of

Client = TestClient[Any, Any]
#: One past PostgreSQL's bigint and integer.
PAST_BIGINT = str(2**63)
PAST_INT4 = str(2**31)
#: Past what Python turns into an int from text (4,300 digits).
HUGE = "9" * 5000
NUL = "%00"


def bad_queries(world: World) -> list[tuple[str, str]]:
    """(address, the parameter its 400 names) for every page that reads a query string."""
    open_set = world.sets["open"]
    return [
        (f"/jobs/?before={PAST_BIGINT}", "before"), (f"/jobs/?before={HUGE}", "before"),
        (f"/jobs/?repo=openaddresses/openaddresses&pr={PAST_INT4}", "pr"),
        (f"/jobs/?repo=open{NUL}addresses", "repo"), (f"/jobs/?state={NUL}", "state"),
        (f"/jobs/?limit={PAST_BIGINT}", "limit"), (f"/sets/?before={PAST_BIGINT}", "before"),
        (f"/sets/{open_set}?problem=skip{NUL}", "problem"),
        (f"/sets/{open_set}?after=4.{'9' * 20}", "after"),
        (f"/sources/?after=us{NUL}", "after"),
        (f"/sources/us/ks/lane?before={PAST_BIGINT}", "before"),
    ]


#: Path parts no row can have: (address, what the 404 page says).
UNKNOWN_PATHS = [
    (f"/jobs/{PAST_BIGINT}", f"There is no job {PAST_BIGINT}."),
    (f"/jobs/{HUGE}", "There is no job 999999999999999999999999999999…"),
    ("/jobs/0", "There is no job 0."), (f"/runs/{PAST_BIGINT}", "There is no run"),
    (f"/runs/{PAST_BIGINT}/out.csv", "There is no run"), (f"/sets/{PAST_BIGINT}", "no set"),
    (f"/sources/us/ca/ala{NUL}meda", "There is no source by that name."),
    (f"/latest/run/us/ca/ala{NUL}meda/addresses/county.zip", "There is no entry by that name."),
    (f"/latest/run/us/ca/alameda/address{NUL}es/county.zip", "There is no entry by that name."),
    (f"/latest/run/us/ca/alameda/addresses/coun{NUL}ty.csv", "There is no entry by that name."),
]


async def test_bad_query_values_are_400_pages_in_the_layout(
    site: Client, site_world: World
) -> None:
    for path, name in bad_queries(site_world):
        text = await html(site, path, status=400)  # in the layout: html() checks
        assert "<title>Bad request · OpenAddresses Machine</title>" in text, path
        assert f"{name}: " in text, (path, name)
        assert "Traceback" not in text and "internal error" not in text, path


async def test_path_parts_no_row_can_have_are_404_pages_in_the_layout(
    site: Client, site_world: World
) -> None:
    for path, said in UNKNOWN_PATHS:
        text = await html(site, path, status=404)
        assert "<title>Not found · OpenAddresses Machine</title>" in text, path
        assert said in text, (path, said)


async def test_bad_values_in_the_api_are_400_or_404_naming_them(
    site: Client, site_world: World
) -> None:
    open_set = site_world.sets["open"]
    for path, name in (
        (f"/api/jobs?before={PAST_BIGINT}", "before"),
        (f"/api/jobs?repo=openaddresses/openaddresses&pr={PAST_INT4}", "pr"),
        (f"/api/jobs?repo=a{NUL}b", "repo"), (f"/api/runs?job={PAST_BIGINT}", "job"),
        (f"/api/runs?set={PAST_BIGINT}", "set"), (f"/api/runs?before={PAST_BIGINT}", "before"),
        (f"/api/runs?source=us/ks/la{NUL}ne", "source"), (f"/api/runs?status={NUL}", "status"),
        (f"/api/sets?before={PAST_BIGINT}", "before"),
        (f"/api/sets/{open_set}?problem=a{NUL}", "problem"),
        (f"/api/sources?after=a{NUL}", "after"),
        (f"/api/sources/us/ks/lane?before={PAST_BIGINT}", "before"),
        (f"/api/workers?after=worker{NUL}", "after"), (f"/api/workers?limit={HUGE}", "limit"),
        (f"/api/workers?limit={PAST_BIGINT}", "limit"),
    ):
        problem = await json_of(site, path, status=400)
        assert problem["error"].startswith(f"{name}: "), (path, problem)
    for path in (f"/api/jobs/{PAST_BIGINT}", f"/api/runs/{HUGE}", "/api/sets/0",
                 f"/api/sources/us/ks/la{NUL}ne", f"/api/deliveries/a{NUL}b"):
        problem = await json_of(site, path, status=404)
        assert problem["error"].startswith("There is no "), (path, problem)


async def test_the_largest_values_the_columns_hold_are_answered(
    site: Client, site_world: World
) -> None:
    """The bounds are the columns' own: their largest values are lists (empty or not), not
    errors."""
    for path in (f"/jobs/?before={2**63 - 1}", f"/jobs/?repo=a&pr={2**31 - 1}",
                 f"/sets/?before={2**63 - 1}"):
        await html(site, path)
    assert (await json_of(site, f"/api/runs?job={2**63 - 1}"))["items"] == []
    assert (await json_of(site, f"/api/jobs?repo=a&pr={2**31 - 1}"))["items"] == []
    assert len((await json_of(site, f"/api/runs?before={2**63 - 1}&limit=200"))["items"]) == 15
    await html(site, f"/jobs/{2**63 - 1}", status=404)


# --- Workers, page by page ------------------------------------------------------------------


async def walk_workers(site: Client, path: str, between: Any = None) -> list[dict[str, Any]]:
    """Every page from ``path`` on; ``between`` is awaited after each page."""
    pages: list[dict[str, Any]] = []
    next_path: str | None = path
    while next_path:
        answer = await json_of(site, next_path)
        pages.append(answer)
        next_path = answer["next"]
        if between is not None:
            await between()
    return pages


async def test_api_workers_follow_next_to_the_end(site: Client, site_world: World) -> None:
    pages = await walk_workers(site, "/api/workers?limit=1")
    names = [worker["name"] for page in pages for worker in page["workers"]]
    assert names == ["worker-1", "worker-2", "worker-3"]
    assert pages[0]["next"] == "/api/workers?limit=1&after=worker-1"
    assert pages[-1]["next"] is None
    # The counts and queues are of all the workers, on every page.
    assert all(page["counts"] == {"active": 1, "inactive": 1, "offline": 1} for page in pages)
    assert all(len(page["queues"]) == 4 for page in pages)
    # One page holds them all (50 by default): no next.
    whole = await json_of(site, "/api/workers")
    assert [worker["name"] for worker in whole["workers"]] == names and whole["next"] is None
    # The page lists every worker, the most recently seen first.
    text = await html(site, "/workers")
    assert text.index("<td>worker-1") < text.index("<td>worker-2") < text.index("<td>worker-3")


async def test_api_workers_pages_stay_whole_while_heartbeats_arrive(
    site: Client, site_world: World, db_pool: asyncpg.Pool
) -> None:
    """The cursor is the name, which a heartbeat does not change: workers seen again (or seen
    first) while a client walks the pages are listed once each."""
    await db_pool.execute(
        "INSERT INTO workers (name, hostname, pid, state, last_seen_at)"
        " SELECT 'worker-' || n, 'host-b', n, 'idle', now() - interval '1 minute'"
        " FROM generate_series(4, 9) n")
    beat = iter(range(4, 10))

    async def heartbeat() -> None:
        # The next worker on the list is the one most recently seen now.
        number = next(beat, None)
        if number is not None:
            await db_pool.execute("UPDATE workers SET last_seen_at = now() WHERE name = $1",
                                  f"worker-{number}")

    pages = await walk_workers(site, "/api/workers?limit=2", heartbeat)
    names = [worker["name"] for page in pages for worker in page["workers"]]
    assert names == [f"worker-{number}" for number in range(1, 10)]

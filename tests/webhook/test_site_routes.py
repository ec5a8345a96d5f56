"""Every page, file and API route of the results site over the seeded world of
``site_data.py`` (real PostgreSQL, RabbitMQ and local storage).

The API's answers are checked against the OpenAPI document in ``test_site_api.py``; here, what
they hold.
"""

from __future__ import annotations

import csv
import io
import re
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from pydantic import SecretStr

from services.demo.github import GitHubStandIn, PostedStatus
from services.webhook.keys import SITE_CACHE
from services.webhook.views import cache
from services.webhook.views.headers import FILE_POLICY, PAGE_POLICY
from services.webhook.views.state import REFERENCE_COLUMNS
from shared.config import Settings
from shared.db import load_migrations
from shared.sets import settle_sets
from shared.storage import open_storage
from tests.webhook.conftest import PUBLIC_BASE_URL, start_site
from tests.webhook.site_data import NOW, XSS, World, add_run

Client = TestClient[Any, Any]
ESCAPED_XSS = "&lt;script&gt;alert(1)&lt;/script&gt;"
#: Only in the site's layout (base.html): an error page in it has the navigation.
LAYOUT_MARK = '<nav aria-label="Sections">'


def secure(response: ClientResponse, *, page: bool) -> None:
    """The headers every answer carries."""
    assert response.headers["X-Content-Type-Options"] == "nosniff", response.url
    assert response.headers["Referrer-Policy"] == "same-origin", response.url
    assert response.headers["Content-Security-Policy"] == (
        PAGE_POLICY if page else FILE_POLICY), response.url


async def html(site: Client, path: str, status: int = 200) -> str:
    response = await site.get(path)
    text = await response.text()
    assert response.status == status, (path, text[:2000])
    assert response.content_type == "text/html", path
    secure(response, page=True)
    assert LAYOUT_MARK in text, path
    return text


async def json_of(site: Client, path: str, status: int = 200) -> Any:
    response = await site.get(path)
    assert response.status == status, (path, await response.text())
    assert response.content_type == "application/json", path
    secure(response, page=False)
    return await response.json()


def rows_of(text: str) -> list[str]:
    """The ``<tr>`` of a page's run tables, in order (``id="run-N"``)."""
    return re.findall(r'<tr id="run-(\d+)"', text)


# --- Home -------------------------------------------------------------------------------------


async def test_home_page_counts_the_latest_good_runs(site: Client, site_world: World) -> None:
    text = await html(site, "/")
    # Current entries: alameda/county, lane/county, lane/city, the XSS entry, wa/skip (king's
    # run is queued; pull-request runs are not published).
    assert re.search(r'<span class="number">4</span><span class="label"><a href="/sources/">'
                     r'sources</a> \(5 entries\)', text)
    # Good runs' addresses: alameda's push (1,300,000), and the old set's lane/county, lane/city
    # and XSS runs (1,000 each): lane/county's newer set run (800) has a regression warning, so
    # the earlier run stays its good data.
    assert '<span class="number">1,303,000</span>' in text
    # Finished today: 4 runs of the open set, the push's and the pull request's two.
    assert '<span class="number">7</span><span class="label">runs finished today' in text
    open_set = site_world.sets["open"]
    assert f'<a href="/sets/{open_set}">set {open_set}</a>' in text
    assert "66.7 %" in text  # 2 of the 3 that ran succeeded (skipped left out)
    assert '<progress value="4" max="6">4 of 6</progress> 4 of 6 settled' in text
    for job_id in site_world.jobs.values():
        assert f'<a href="/jobs/{job_id}">{job_id}</a>' in text
    for section in ("/jobs/", "/sets/", "/sources/", "/workers", "/api/", "/state.txt",
                    "/index.json", "/latest/set", "/api/openapi.json"):
        assert f'href="{section}"' in text


# --- Jobs -------------------------------------------------------------------------------------


async def test_jobs_page_lists_newest_first_and_filters(site: Client, site_world: World) -> None:
    jobs = site_world.jobs
    text = await html(site, "/jobs/")
    listed = [int(found) for found in re.findall(r'<tr><td><a href="/jobs/(\d+)">', text)]
    assert listed == sorted(jobs.values(), reverse=True)
    assert "2 runs: 1 succeeded, 1 failed" in text  # the pull request's runs

    def listed_in(text: str) -> set[int]:
        return {int(found) for found in re.findall(r'<tr><td><a href="/jobs/(\d+)">', text)}

    assert listed_in(await html(site, "/jobs/?state=failure")) == {jobs["pr"]}
    assert listed_in(await html(site, "/jobs/?state=running")) == {jobs["running"]}
    assert listed_in(await html(site, "/jobs/?state=success")) == {jobs["push"]}
    by_pr = await html(site, "/jobs/?repo=openaddresses/openaddresses&pr=7")
    assert listed_in(by_pr) == {jobs["pr"]}
    assert listed_in(await html(site, "/jobs/?repo=someone/else")) == set()
    # A pull request number alone names nothing; a bad state is named.
    assert "needs its repo" in await html(site, "/jobs/?pr=7", status=400)
    assert "state" in await html(site, "/jobs/?state=exploded", status=400)


async def test_jobs_pages_follow_next_to_the_end(site: Client, site_world: World) -> None:
    seen: list[int] = []
    path: str | None = "/jobs/?limit=1"
    while path:
        text = await html(site, path)
        seen.extend(int(found) for found in re.findall(r'<tr><td><a href="/jobs/(\d+)">', text))
        found = re.search(r'<a href="([^"]+)" rel="next">', text)
        path = found.group(1).replace("&amp;", "&") if found else None
        assert path is None or "limit=1" in path
    assert seen == sorted(site_world.jobs.values(), reverse=True)


async def test_job_page(site: Client, site_world: World) -> None:
    runs = site_world.runs
    text = await html(site, f"/jobs/{site_world.jobs['pr']}")
    assert "2 runs: 1 succeeded, 1 failed" in text
    assert 'id="job-status">failure<' in text
    assert "conform_failed" in text and f"field {ESCAPED_XSS} is missing" in text
    assert rows_of(text) == [str(runs["pr_failed"]), str(runs["pr_good"])]
    # Features with thousands separators, a dash when there are none (the failed run).
    failed_row = text[text.index(f'id="run-{runs["pr_failed"]}"'):]
    failed_row = failed_row[:failed_row.index("</tr>")]
    assert '<td class="number" data-label="Features">—</td>' in failed_row
    assert '<td class="number" data-label="Duration">42.0 s</td>' in failed_row
    # The pull request and the commit: the demo's GitHub page in demo mode.
    assert 'href="/demo/github">pull request #7</a>' in text
    assert f'<a href="/demo/github"><code>{"b" * 40}</code></a>' in text
    assert f'href="/runs/{runs["pr_good"]}/out.csv">out.csv</a>' in text
    assert "Refresh" not in (await site.get(f"/jobs/{site_world.jobs['pr']}")).headers

    push = await html(site, f"/jobs/{site_world.jobs['push']}")
    assert '<td class="number" data-label="Features">1,300,000</td>' in push


async def test_running_job_refreshes_and_counts_elapsed_time(
    site: Client, site_world: World
) -> None:
    response = await site.get(f"/jobs/{site_world.jobs['running']}")
    text = await response.text()
    assert response.headers["Refresh"] == "10"
    assert "2 runs: 1 running, 1 queued" in text
    running = text[text.index(f'id="run-{site_world.runs["job_running"]}"'):]
    running = running[:running.index("</tr>")]
    # Started 75 s before the world was made: the duration is the time elapsed since.
    found = re.search(r'data-label="Duration">(\d+) min (\d+) s<', running)
    assert found and int(found.group(1)) * 60 + int(found.group(2)) >= 75
    assert '<span class="badge running">running</span>' in running


async def test_job_page_links_to_github_outside_demo_mode(
    site_settings: Settings, site_world: World, db_pool: asyncpg.Pool
) -> None:
    token = SecretStr("x" * 40)  # a token: not demo mode
    client = await start_site(site_settings.model_copy(update={"github_token": token}))
    try:
        text = await html(client, f"/jobs/{site_world.jobs['pr']}")
    finally:
        await client.close()
    base = site_settings.github_api_url
    assert f'href="{base}/openaddresses/openaddresses/pull/7">pull request #7' in text
    # The commit and the source file of a pull request are in the contributor's repository.
    assert f'href="{base}/someone/openaddresses/commit/{"b" * 40}"' in text
    assert f'href="{base}/someone/openaddresses/blob/{"b" * 40}/sources/us/ks/new.json"' in text


# --- Runs -------------------------------------------------------------------------------------


async def test_run_page_shows_everything_about_a_run(site: Client, site_world: World) -> None:
    run_id = site_world.runs["set_good"]
    text = await html(site, f"/runs/{run_id}")
    assert '<a href="/sources/us/ca/alameda">us/ca/alameda</a> · addresses · county' in text
    assert 'id="run-state">success<' in text
    assert "1,234,567 features" in text
    # The log, the sample (as a table, its text escaped), the preview, every output.
    assert f"run {run_id} of sources/us/ca/alameda.json &lt;b&gt;log&lt;/b&gt;" in text
    assert "<td>Elm &lt;b&gt;St&lt;/b&gt;</td>" in text
    assert f'<img class="preview" src="/runs/{run_id}/preview.png"' in text
    for name in ("index.json", "out.csv", "out.geojson", "output.txt", "preview.png",
                 "processed.zip", "sample.json"):
        assert f'<li><a href="/runs/{run_id}/{name}">{name}</a></li>' in text
    # The entry exactly as it was run; the timings; the earlier run of the same entry (the
    # old set's).
    assert "&#34;number&#34;: &#34;N&#34;" in text
    assert "<dt>duration</dt><dd>42.0 s</dd>" in text
    assert "<dt>process time</dt><dd>2.2 s</dd>" in text
    earlier = text[text.index("Earlier runs of this entry"):]
    assert len(rows_of(earlier)) == 1
    assert f'href="/sets/{site_world.sets["open"]}"' in text


async def test_failed_run_page_shows_problem_and_message(site: Client, site_world: World) -> None:
    text = await html(site, f"/runs/{site_world.runs['set_failed']}")
    assert "<code>download_failed</code>" in text
    assert 'id="run-error">GET http://example.org/' + ESCAPED_XSS + \
        ": HTTP 404 &lt;img src=x onerror=alert(2)&gt;</pre>" in text
    assert "<img src=x" not in text


async def test_run_page_shows_the_log_of_a_run_in_progress(
    site: Client, site_world: World, site_settings: Settings
) -> None:
    run_id = site_world.runs["set_running"]
    text = await html(site, f"/runs/{run_id}")
    assert "The log appears when the run has written it." in text
    async with open_storage(site_settings) as storage:
        await storage.put_bytes(f"runs/{run_id}/output.txt", b"downloading <part 1>\n")
    response = await site.get(f"/runs/{run_id}")
    text = await response.text()
    assert response.headers["Refresh"] == "10"
    assert '<pre class="block" id="log">downloading &lt;part 1&gt;\n</pre>' in text


async def test_run_files_are_downloads_with_safe_types(
    site: Client, site_world: World, site_settings: Settings
) -> None:
    run_id = site_world.runs["set_good"]
    expected = {
        "out.csv": ("text/csv", "attachment"), "processed.zip": ("application/zip", "attachment"),
        "out.geojson": ("application/geo+json", "attachment"),
        "output.txt": ("text/plain", "inline"), "preview.png": ("image/png", "inline"),
        "sample.json": ("application/json", "inline"),
    }
    async with open_storage(site_settings) as storage:
        for name, (content_type, kind) in expected.items():
            response = await site.get(f"/runs/{run_id}/{name}")
            assert response.status == 200, name
            assert response.content_type == content_type, name
            assert response.headers["Content-Disposition"] == \
                f'{kind}; filename="run-{run_id}-{name}"'
            secure(response, page=False)
            assert await response.read() == await storage.get_bytes(f"runs/{run_id}/{name}")
    # Not an output of the run; an output gone from storage: a 404 page.
    assert "has no output" in await html(site, f"/runs/{run_id}/secret.txt", status=404)
    async with open_storage(site_settings) as storage:
        await storage.delete(f"runs/{run_id}/out.csv")
    assert "missing from storage" in await html(site, f"/runs/{run_id}/out.csv", status=404)


# --- Sources ----------------------------------------------------------------------------------


async def test_sources_page_lists_current_sources(site: Client, site_world: World) -> None:
    text = await html(site, "/sources/")
    names = re.findall(r'<tr><td><a href="/sources/([^"]+)">', text)
    assert names == ["us/ca/alameda", "us/ks/lane", "us/wa/skip", "zz/xss"]
    assert "us/ks/new" not in text  # only a pull request ran it
    assert 'href="/latest/run/us/ca/alameda/addresses/county.zip">zip</a>' in text
    assert ESCAPED_XSS in text and XSS not in text


async def test_sources_pages_follow_next_to_the_end(site: Client, site_world: World) -> None:
    seen: list[str] = []
    path: str | None = "/sources/?limit=1"
    while path:
        text = await html(site, path)
        seen.extend(re.findall(r'<tr><td><a href="/sources/([^"]+)">', text))
        found = re.search(r'<a href="([^"]+)" rel="next">', text)
        path = found.group(1).replace("&amp;", "&") if found else None
    assert seen == ["us/ca/alameda", "us/ks/lane", "us/wa/skip", "zz/xss"]


async def test_source_page_history_chart_and_downloads(site: Client, site_world: World) -> None:
    runs = site_world.runs
    text = await html(site, "/sources/us/ks/lane")
    # Both entries, the latest good data of each.
    assert "<td>county</td>" in text and "<td>city</td>" in text
    assert 'href="/latest/run/us/ks/lane/addresses/county.zip">zip</a>' in text
    assert 'href="/latest/run/us/ks/lane/addresses/city.csv">csv</a>' in text
    # The chart, drawn on the server; the set run that fell from 1,000 to 800 features is a
    # regression.
    assert '<svg class="chart"' in text
    assert f"run {runs['set_regression']}, " in text and "800 features, regression" in text
    assert f'<li><a href="/runs/{runs["set_regression"]}">run {runs["set_regression"]}</a>, ' \
        f"addresses/county" in text
    # Every run of the source, newest first, the pull request's and the open ones too.
    listed = [int(run_id) for run_id in rows_of(text)]
    assert listed == sorted(listed, reverse=True)
    assert {runs["set_regression"], runs["set_running"], runs["job_running"]} <= set(listed)
    assert len(listed) == 5  # 2 old-set runs, 2 open-set runs, the running job's


async def test_source_page_pages_its_runs(site: Client, site_world: World) -> None:
    seen: list[str] = []
    path: str | None = "/sources/us/ks/lane?limit=2"
    while path:
        text = await html(site, path)
        seen.extend(rows_of(text))
        found = re.search(r'<a href="([^"]+)" rel="next">', text)
        path = found.group(1).replace("&amp;", "&") if found else None
    assert len(seen) == len(set(seen)) == 5
    assert [int(run_id) for run_id in seen] == sorted((int(r) for r in seen), reverse=True)


async def test_source_with_only_pull_request_runs(site: Client, site_world: World) -> None:
    text = await html(site, "/sources/us/ks/new")
    assert "No published run yet" in text
    assert rows_of(text) == [str(site_world.runs["pr_good"])]


# --- Sets -------------------------------------------------------------------------------------


async def test_sets_page(site: Client, site_world: World) -> None:
    text = await html(site, "/sets/")
    listed = [int(found) for found in re.findall(r'<tr><td><a href="/sets/(\d+)">', text)]
    assert listed == [site_world.sets["open"], site_world.sets["old"]]
    assert '<progress value="4" max="6">' in text
    assert '<progress value="4" max="4">' in text  # the old set: all four settled


async def test_set_page_failures_first_with_counts_and_filters(
    site: Client, site_world: World
) -> None:
    runs, set_id = site_world.runs, site_world.sets["open"]
    response = await site.get(f"/sets/{set_id}")
    assert response.headers["Refresh"] == "30"  # in progress
    text = await html(site, f"/sets/{set_id}")
    assert '<progress value="4" max="6">4 of 6</progress> 4 of 6 settled' in text
    order = [int(run_id) for run_id in rows_of(text)]
    assert order == [runs["set_failed"], runs["set_running"], runs["set_queued"],
                     runs["set_skipped"], runs["set_good"], runs["set_regression"]]
    for state, count in (("failure", 1), ("running", 1), ("queued", 1), ("skipped", 1),
                         ("success", 2)):
        assert f'<span class="{state}">{state}</span> ({count})' in text
    assert "<code>download_failed</code> (1)" in text and "<code>skip_source</code> (1)" in text

    assert rows_of(await html(site, f"/sets/{set_id}?state=success")) == [
        str(runs["set_good"]), str(runs["set_regression"])]
    assert rows_of(await html(site, f"/sets/{set_id}?problem=skip_source")) == [
        str(runs["set_skipped"])]
    assert rows_of(await html(site, f"/sets/{set_id}?state=success&problem=skip_source")) == []
    await html(site, f"/sets/{set_id}?state=bogus", status=400)
    await html(site, f"/sets/{set_id}?after=9.1", status=400)


async def test_set_pages_follow_next_to_the_end(site: Client, site_world: World) -> None:
    runs, set_id = site_world.runs, site_world.sets["open"]
    for query, expected in (
        ("limit=1", ["set_failed", "set_running", "set_queued", "set_skipped", "set_good",
                     "set_regression"]),
        ("limit=1&state=success", ["set_good", "set_regression"]),
    ):
        seen: list[int] = []
        path: str | None = f"/sets/{set_id}?{query}"
        while path:
            text = await html(site, path)
            seen.extend(int(run_id) for run_id in rows_of(text))
            found = re.search(r'<a href="([^"]+)" rel="next">', text)
            path = found.group(1).replace("&amp;", "&") if found else None
        assert seen == [runs[name] for name in expected], query


async def test_finished_set_is_not_refreshed(site: Client, site_world: World) -> None:
    response = await site.get(f"/sets/{site_world.sets['old']}")
    assert response.status == 200 and "Refresh" not in response.headers
    assert "100.0 %" in await response.text()


async def _finish_open_set(db_pool: asyncpg.Pool, world: World) -> int:
    """The open set's two open runs settled, then the set finished as the dequeuer does."""
    set_id = world.sets["open"]
    await db_pool.execute("UPDATE runs SET status = 'success', finished_at = $2 WHERE id = $1",
                          world.runs["set_running"], NOW)
    await db_pool.execute(
        "UPDATE runs SET status = 'failure', source_problem = 'download_failed', "
        "finished_at = $2 WHERE id = $1", world.runs["set_queued"], NOW)
    async with db_pool.acquire() as conn, conn.transaction():
        assert await settle_sets(conn, [set_id]) == [set_id]
    return set_id


async def test_finished_set_pages_read_the_counts_it_stored(
    site: Client, site_world: World, db_pool: asyncpg.Pool
) -> None:
    set_id = await _finish_open_set(db_pool, site_world)
    stored = await db_pool.fetchval("SELECT counts FROM sets WHERE id = $1", set_id)
    assert stored["by_problem"] == {"download_failed": 2, "skip_source": 1}
    pages = (f"/sets/{set_id}", "/sets/", f"/api/sets/{set_id}", "/api/sets")
    from_stored = [await (await site.get(path)).text() for path in pages]
    text = from_stored[0]
    assert '<progress value="6" max="6">6 of 6</progress> 6 of 6 settled' in text
    for state, count in (("failure", 2), ("skipped", 1), ("success", 3)):
        assert f'<span class="{state}">{state}</span> ({count})' in text
    assert "<code>download_failed</code> (2)" in text and "<code>skip_source</code> (1)" in text
    assert text.index("download_failed</code> (") < text.index("skip_source</code> (")

    # Counted from the runs instead (counts stored before migration 0009 lack by_problem):
    # every page and answer is the same.
    await db_pool.execute("UPDATE sets SET counts = counts - 'by_problem' WHERE id = $1", set_id)
    site.app[SITE_CACHE].forget()
    assert [await (await site.get(path)).text() for path in pages] == from_stored

    # And the pages do read what was stored, without counting again.
    await db_pool.execute(
        "UPDATE sets SET counts = counts || '{\"by_problem\": {\"only_stored\": 7}, "
        "\"failed\": 5}' WHERE id = $1", set_id)
    site.app[SITE_CACHE].forget()
    text = await html(site, f"/sets/{set_id}")
    assert "<code>only_stored</code> (7)" in text and "download_failed</code> (" not in text
    assert '<span class="failure">failure</span> (5)' in text


async def test_migration_0009_stores_what_a_finishing_set_stores(
    site: Client, site_world: World, db_pool: asyncpg.Pool
) -> None:
    set_id = await _finish_open_set(db_pool, site_world)
    stored = await db_pool.fetchval("SELECT counts FROM sets WHERE id = $1", set_id)
    await db_pool.execute("UPDATE sets SET counts = counts - 'by_problem' WHERE id = $1", set_id)
    (migration,) = [found for found in load_migrations() if found.version == "0009"]
    await db_pool.execute(migration.sql)
    assert await db_pool.fetchval("SELECT counts FROM sets WHERE id = $1", set_id) == stored
    # Sets in progress and sets that stored nothing are left alone.
    assert await db_pool.fetchval(
        "SELECT count(*) FROM sets WHERE counts ? 'by_problem'") == 1


# --- Workers ----------------------------------------------------------------------------------


async def test_workers_page(site: Client, site_world: World) -> None:
    text = await html(site, "/workers")
    assert "1 active, 1 inactive (no heartbeat for 10 minutes), 1 offline (none for 20 " \
        "minutes)" in text
    worker_1 = text[text.index("<td>worker-1"):]
    worker_1 = worker_1[:worker_1.index("</tr>")]
    assert "badge active" in worker_1 and "<td>0.1.0</td>" in worker_1
    assert f'<a href="/runs/{site_world.runs["set_running"]}">run ' in worker_1
    # Running for: since the run started, 3 minutes before the world was made (site_data.NOW,
    # set when the tests were imported).
    running_for = re.search(r'<td class="number">(\d+) min (\d+) s</td>', worker_1)
    assert running_for and int(running_for.group(1)) * 60 + int(running_for.group(2)) >= 180
    assert 'badge inactive">inactive' in text and 'badge offline">offline' in text
    # The queues' depths, from RabbitMQ (empty and unconsumed in the test).
    for queue in ("tasks", "done", "due", "dead"):
        assert re.search(rf'<code>[a-z.]*{queue}[a-z.]*</code></td><td class="number">0</td>',
                         text), queue


# --- Latest downloads ------------------------------------------------------------------------


async def test_latest_run_redirects_to_the_newest_good_output(
    site: Client, site_world: World
) -> None:
    push_good = site_world.runs["push_good"]
    for extension, name in (("zip", "processed.zip"), ("csv", "out.csv"),
                            ("geojson", "out.geojson")):
        response = await site.get(f"/latest/run/us/ca/alameda/addresses/county.{extension}",
                                  allow_redirects=False)
        assert response.status == 302
        assert response.headers["Location"] == f"/runs/{push_good}/{name}"
        secure(response, page=False)
    # lane/city's run in the open set is still running: the old set's run is the newest good.
    response = await site.get("/latest/run/us/ks/lane/addresses/city.zip", allow_redirects=False)
    old_city = int(response.headers["Location"].split("/")[2])
    assert old_city < site_world.runs["set_good"]
    # The XSS entry's name, encoded: its newest good run is the old set's (the open set's
    # failed).
    response = await site.get(f"/latest/run/zz/xss/addresses/{quote(XSS, safe='')}.csv",
                              allow_redirects=False)
    assert response.status == 302
    for missing in ("/latest/run/us/ca/alameda/addresses/nothing.zip",
                    "/latest/run/us/ca/alameda/addresses/county.txt",
                    "/latest/run/us/ca/alameda.zip", "/latest/run/us/ks/new/addresses/county.zip",
                    "/latest/run/us/wa/skip/addresses/county.zip"):
        await html(site, missing, status=404)


async def test_latest_run_skips_a_newer_warned_run(
    site: Client, site_world: World, db_pool: asyncpg.Pool, site_settings: Settings
) -> None:
    async with open_storage(site_settings) as storage:
        # A newer good run of alameda, in a set, whose counts fell: the dequeuer sets the
        # warning after the status, in the same transaction.
        async with db_pool.acquire() as conn, conn.transaction():
            warned = await add_run(conn, storage, source_path="sources/us/ca/alameda.json",
                                   set_id=site_world.sets["open"], features=10,
                                   finished=NOW + timedelta(minutes=5))
            await conn.execute("UPDATE runs SET warning = 'fell by 99 %' WHERE id = $1", warned)
    response = await site.get("/latest/run/us/ca/alameda/addresses/county.zip",
                              allow_redirects=False)
    assert response.headers["Location"] == f"/runs/{site_world.runs['push_good']}/processed.zip"
    # It is the entry's latest run all the same.
    source = await html(site, "/sources/us/ca/alameda")
    assert f'<a href="/runs/{warned}"><span class="badge success">' in source


async def test_latest_set_is_the_newest_finished_one(
    site: Client, site_world: World, db_pool: asyncpg.Pool
) -> None:
    response = await site.get("/latest/set", allow_redirects=False)
    assert response.status == 302
    assert response.headers["Location"] == f"/sets/{site_world.sets['old']}"
    await db_pool.execute("UPDATE sets SET finished_at = now(), status = 'failure' WHERE id = $1",
                          site_world.sets["open"])
    response = await site.get("/latest/set", allow_redirects=False)
    assert response.headers["Location"] == f"/sets/{site_world.sets['open']}"
    await db_pool.execute("DELETE FROM sets")
    assert "No set has finished yet" in await html(site, "/latest/set", status=404)


# --- Machine-readable files ---------------------------------------------------------------------


async def test_state_txt(site: Client, site_world: World) -> None:
    response = await site.get("/state.txt")
    assert response.status == 200
    assert response.content_type == "text/plain"
    secure(response, page=False)
    table = list(csv.reader(io.StringIO(await response.text()), dialect="excel-tab"))
    header, rows = table[0], table[1:]
    assert tuple(header[:16]) == REFERENCE_COLUMNS
    assert header[:3] == ["source", "cache", "sample"]
    by_entry = {(row[header.index("source")], row[header.index("name")]): dict(zip(header, row,
                                                                                strict=True))
                for row in rows}
    assert set(by_entry) == {("us/ca/alameda.json", "county"), ("us/ks/lane.json", "county"),
                             ("us/ks/lane.json", "city"), ("zz/xss.json", XSS),
                             ("us/wa/skip.json", "county")}
    alameda = by_entry[("us/ca/alameda.json", "county")]
    push_good = site_world.runs["push_good"]
    assert alameda["run id"] == str(push_good)
    assert alameda["processed"] == f"{PUBLIC_BASE_URL}/runs/{push_good}/out.csv"
    assert alameda["output"] == f"{PUBLIC_BASE_URL}/runs/{push_good}/output.txt"
    assert alameda["address count"] == "1300000"
    assert alameda["attribution required"] == "true" and alameda["share-alike"] == "false"
    assert alameda["cache time"] == "1.5" and alameda["process hash"] == ""
    assert by_entry[("zz/xss.json", XSS)]["source problem"] == "download_failed"
    # Validators: an unchanged file is not sent again.
    again = await site.get("/state.txt", headers={"If-None-Match": response.headers["ETag"]})
    assert again.status == 304


async def test_index_json(site: Client, site_world: World) -> None:
    index = await json_of(site, "/index.json")
    assert index["run_states_url"] == f"{PUBLIC_BASE_URL}/state.txt"
    assert index["latest_set_url"] == f"{PUBLIC_BASE_URL}/sets/{site_world.sets['old']}"
    assert index["latest_run_processed_url"] == \
        f"{PUBLIC_BASE_URL}/latest/run/{{source}}/{{layer}}/{{entry}}.zip"
    assert index["openapi_url"] == f"{PUBLIC_BASE_URL}/api/openapi.json"


# --- API ----------------------------------------------------------------------------------------


async def test_api_lists_follow_next_to_the_end(site: Client, site_world: World) -> None:
    async def walk(path: str) -> list[Any]:
        items: list[Any] = []
        next_path: str | None = path
        while next_path:
            answer = await json_of(site, next_path)
            items.extend(answer["items"] if "items" in answer else answer["runs"])
            next_path = answer["next"]
        return items

    every_run = await db_ids(site, "/api/runs?limit=200")
    paged = [run["id"] for run in await walk("/api/runs?limit=3")]
    assert paged == every_run and len(paged) == len(set(paged)) == 15
    assert [job["id"] for job in await walk("/api/jobs?limit=1")] == \
        sorted(site_world.jobs.values(), reverse=True)
    assert [item["id"] for item in await walk("/api/sets?limit=1")] == \
        sorted(site_world.sets.values(), reverse=True)
    assert [item["source"] for item in await walk("/api/sources?limit=3")] == \
        ["us/ca/alameda", "us/ks/lane", "us/wa/skip", "zz/xss"]
    set_runs = await walk(f"/api/sets/{site_world.sets['open']}?limit=4")
    assert [run["state"] for run in set_runs] == \
        ["failure", "running", "queued", "skipped", "success", "success"]
    lane = await walk("/api/sources/us/ks/lane?limit=2")
    assert len(lane) == len({run["id"] for run in lane}) == 5


async def db_ids(site: Client, path: str) -> list[int]:
    answer = await json_of(site, path)
    assert answer["next"] is None
    return [item["id"] for item in answer["items"]]


async def test_api_runs_filters(site: Client, site_world: World) -> None:
    runs = site_world.runs
    assert await db_ids(site, "/api/runs?status=failure") == \
        [runs["pr_failed"], runs["set_failed"]]
    assert set(await db_ids(site, "/api/runs?status=open")) == \
        {runs["set_running"], runs["set_queued"], runs["job_running"], runs["job_queued"]}
    assert await db_ids(site, f"/api/runs?job={site_world.jobs['pr']}") == \
        [runs["pr_good"], runs["pr_failed"]]
    assert len(await db_ids(site, f"/api/runs?set={site_world.sets['open']}")) == 6
    assert await db_ids(site, "/api/runs?source=us/ks/new") == [runs["pr_good"]]
    assert await db_ids(site, f"/api/runs?set={site_world.sets['open']}&status=skipped") == \
        [runs["set_skipped"]]
    problem = await json_of(site, "/api/runs?job=1&set=1", status=400)
    assert "give one of them" in problem["error"]
    assert "limit" in (await json_of(site, "/api/runs?limit=0", status=400))["error"]
    assert "surprise" in (await json_of(site, "/api/runs?surprise=1", status=400))["error"]


async def test_api_details(site: Client, site_world: World) -> None:
    runs = site_world.runs
    job = await json_of(site, f"/api/jobs/{site_world.jobs['pr']}")
    assert job["job"]["runs"]["failure"] == 1 and job["job"]["pr_url"] == "/demo/github"
    assert [run["id"] for run in job["runs"]] == [runs["pr_failed"], runs["pr_good"]]
    run = await json_of(site, f"/api/runs/{runs['set_good']}")
    assert run["features"] == 1_234_567 and run["entry"]["name"] == "county"
    assert run["files"]["out.csv"] == f"/runs/{runs['set_good']}/out.csv"
    assert len(run["earlier"]) == 1
    the_set = await json_of(site, f"/api/sets/{site_world.sets['open']}")
    assert the_set["set"]["runs"]["total"] == 6
    assert the_set["problems"] == {"download_failed": 1, "skip_source": 1}
    source = await json_of(site, "/api/sources/us/ca/alameda")
    assert source["source"]["entries"][0]["good_run_id"] == runs["push_good"]
    assert source["source"]["entries"][0]["downloads"]["zip"] == \
        "/latest/run/us/ca/alameda/addresses/county.zip"
    workers = await json_of(site, "/api/workers")
    assert workers["counts"] == {"active": 1, "inactive": 1, "offline": 1}
    assert {queue["ready"] for queue in workers["queues"]} == {0}
    summary = await json_of(site, "/api/summary")
    assert (summary["sources"], summary["entries"], summary["addresses"]) == (4, 5, 1_303_000)


# --- Errors -------------------------------------------------------------------------------------


async def test_unknown_ids_and_paths_are_404_pages_in_the_layout(
    site: Client, site_world: World
) -> None:
    for path, said in (
        ("/jobs/987654", "There is no job 987654."), ("/runs/987654", "There is no run 987654."),
        ("/sets/987654", "There is no set 987654."),
        ("/jobs/99999999999999999999999", "no job"),
        ("/sources/xx/nowhere", "There is no source xx/nowhere"),
        ("/runs/987654/out.csv", "has no output"),
        ("/no/such/page", "There is no page at /no/such/page."),
        ("/jobs/abc", "There is no page at /jobs/abc."),
    ):
        text = await html(site, path, status=404)
        assert said in text, path
        assert "<title>Not found · OpenAddresses Machine</title>" in text
        assert "Traceback" not in text
    for path in ("/api/jobs/987654", "/api/runs/987654", "/api/sets/987654",
                 "/api/sources/xx/nowhere", "/api/nothing"):
        assert "error" in await json_of(site, path, status=404)


async def test_escaped_everywhere(site: Client, site_world: World) -> None:
    """The entry named ``<script>alert(1)</script>`` renders as text on every page showing it."""
    runs = site_world.runs
    for path in ("/sources/", "/sources/zz/xss", f"/sets/{site_world.sets['open']}",
                 f"/runs/{runs['set_failed']}", f"/jobs/{site_world.jobs['pr']}",
                 f"/runs/{runs['pr_failed']}", "/workers"):
        text = await html(site, path)
        if path != "/workers":
            assert ESCAPED_XSS in text, path
        assert "<script" not in text, path
        assert "onerror=alert" not in text.replace("onerror=alert(2)&gt;", ""), path


async def test_every_answer_carries_the_security_headers(
    site: Client, site_world: World
) -> None:
    run_id = site_world.runs["set_good"]
    for path, page in (
        ("/", True), ("/jobs/", True), ("/no/such/page", True), ("/api/runs", False),
        ("/api/nothing", False), ("/state.txt", False), ("/index.json", False),
        (f"/runs/{run_id}/out.csv", False), ("/static/site.css", False),
        ("/static/favicon.svg", False), ("/robots.txt", False), ("/health", False),
        ("/api/openapi.json", False), ("/jobs", False), ("/latest/set", False),
    ):
        response = await site.get(path, allow_redirects=False)
        secure(response, page=page)


async def test_old_addresses_redirect(site: Client, site_world: World) -> None:
    for old, new in (("/jobs", "/jobs/"), ("/sets", "/sets/"), ("/sources", "/sources/"),
                     ("/api", "/api/"), ("/workers/", "/workers"),
                     (f"/sets/{site_world.sets['old']}/", f"/sets/{site_world.sets['old']}"),
                     ("/favicon.ico", "/static/favicon.svg")):
        response = await site.get(old, allow_redirects=False)
        assert response.status == 301 and response.headers["Location"] == new, old


async def test_api_page_lists_every_endpoint(site: Client, site_world: World) -> None:
    text = await html(site, "/api/")
    for path in ("/api/summary", "/api/jobs", "/api/runs", "/api/sets", "/api/sources",
                 "/api/workers", "/api/schedule"):
        assert f'<a href="{path}"><code>{path}</code></a>' in text
    assert "<code>/api/jobs/{job_id}</code>" in text


# --- The demo's GitHub ------------------------------------------------------------------------


async def test_demo_github_page_shows_what_the_stand_in_received(
    site: Client, site_world: World, site_github: GitHubStandIn
) -> None:
    assert "No status yet." in await html(site, "/demo/github")
    site_github.statuses.append(PostedStatus(
        repo="openaddresses/openaddresses", sha="b" * 40, state="failure",
        description="1 of 2 failed: <zz/xss>", target_url=f"{PUBLIC_BASE_URL}/jobs/2",
        context="openaddresses/hooked"))
    site_github.comments[41] = ("openaddresses/openaddresses", 7, f"| {XSS} | failed |")
    text = await html(site, "/demo/github")
    assert f"<code>{'b' * 10}</code>" in text
    assert '<span class="badge failure">failure</span>' in text
    assert "<td>openaddresses/hooked</td>" in text and "1 of 2 failed: &lt;zz/xss&gt;" in text
    assert f'<a href="{PUBLIC_BASE_URL}/jobs/2">' in text
    assert "<strong>openaddresses/openaddresses #7</strong> (comment 41)" in text
    assert f"| {ESCAPED_XSS} | failed |" in text
    # In demo mode the navigation leads to it.
    assert '<a href="/demo/github"' in await html(site, "/")


async def test_demo_github_page_when_the_stand_in_is_away(
    site_settings: Settings, site_world: World
) -> None:
    away = site_settings.model_copy(update={"github_api_url": "http://127.0.0.1:9"})
    client = await start_site(away)
    try:
        text = await html(client, "/demo/github")
    finally:
        await client.close()
    assert "The GitHub stand-in at http://127.0.0.1:9 did not answer" in text


async def test_no_demo_github_page_outside_demo_mode(
    site_settings: Settings, site_world: World
) -> None:
    client = await start_site(site_settings.model_copy(update={"github_token": SecretStr("t")}))
    try:
        text = await html(client, "/demo/github", status=404)
        home = await html(client, "/")
    finally:
        await client.close()
    assert "This is not a demo" in text
    assert "/demo/github" not in home


# --- The schedule -----------------------------------------------------------------------------


async def _slots(pool: asyncpg.Pool) -> None:
    """A batch slot done last Friday, a collections slot that failed (its detail is text from
    an exception), clean-up never run."""
    await pool.execute(
        """
        INSERT INTO schedule_runs (slot_id, entry, slot_at, started_at, finished_at, outcome,
                                   detail)
        VALUES ('batch:2026-11-27T12:00:00+00:00', 'batch', '2026-11-27 12:00+00',
                '2026-11-27 12:00:01+00', '2026-11-27 12:00:09+00', 'done', 'set 12'),
               ('batch:2026-11-20T12:00:00+00:00', 'batch', '2026-11-20 12:00+00',
                '2026-11-20 12:00:01+00', '2026-11-20 12:00:09+00', 'done', 'set 11'),
               ('collections:2026-12-03T03:00:00+00:00', 'collections', '2026-12-03 03:00+00',
                '2026-12-03 03:00:02+00', '2026-12-03 03:01:00+00', 'failed',
                'storage said <b>no</b>')
        """)


async def test_schedule_api(
    site_settings: Settings, site_world: World, db_pool: asyncpg.Pool
) -> None:
    await _slots(db_pool)
    client = await start_site(site_settings.model_copy(update={"schedule_clean_up": "off"}))
    try:
        answer = await json_of(client, "/api/schedule")
    finally:
        await client.close()
    entries = {item["entry"]: item for item in answer["entries"]}
    assert list(entries) == ["batch", "collections", "clean-up"]
    batch = entries["batch"]
    assert batch["cron"] == site_settings.schedule_batch == "0 12 * * 5"
    # The latest slot recorded, with its outcome; the next slot after now (a Friday, 12:00).
    assert batch["last"]["slot_id"] == "batch:2026-11-27T12:00:00+00:00"
    assert (batch["last"]["outcome"], batch["last"]["detail"]) == ("done", "set 12")
    following = datetime.fromisoformat(batch["next"])
    assert following > datetime.fromisoformat(answer["now"])
    assert (following.weekday(), following.hour, following.minute) == (4, 12, 0)
    assert following - datetime.fromisoformat(answer["now"]) <= timedelta(days=7)
    assert entries["collections"]["last"]["outcome"] == "failed"
    assert entries["clean-up"] == {"entry": "clean-up", "cron": "off", "last": None,
                                   "next": None}


async def test_schedule_on_the_home_page(
    site: Client, site_world: World, db_pool: asyncpg.Pool
) -> None:
    before = await html(site, "/")
    table = before[before.index('<table id="schedule">'):]
    table = table[:table.index("</table>")]
    assert "<td>batch</td>" in table and "<code>0 12 * * 5</code>" in table
    assert table.count("<td>—</td>") == 3  # nothing recorded yet
    await _slots(db_pool)
    # The page is kept for a few seconds (views/cache.py): the same page until forgotten.
    assert await html(site, "/") == before
    site.app[SITE_CACHE].forget()
    text = await html(site, "/")
    table = text[text.index('<table id="schedule">'):]
    table = table[:table.index("</table>")]
    rows = table.split("<tr>")[2:]
    assert [row.split("</td>")[0].strip().removeprefix("<td>") for row in rows] == [
        "batch", "collections", "clean-up"]
    assert '2026-11-27 12:00 UTC</time> <span class="badge done">done</span>' in rows[0]
    assert '<span class="file">set 12</span>' in rows[0]
    assert '<span class="badge failed">failed</span>' in rows[1]
    assert "storage said &lt;b&gt;no&lt;/b&gt;" in rows[1]
    assert "<td>—</td>" in rows[2]
    for row in rows:  # every entry is on, with a next slot
        assert re.search(r'<td><time datetime="[0-9T:+-]+">\d{4}-\d\d-\d\d \d\d:\d\d UTC'
                         r"</time></td>\s*</tr>", row), row


# --- What is kept between requests -------------------------------------------------------------


async def test_counts_of_finished_sets_are_kept_and_of_open_sets_refreshed(
    site: Client, site_world: World, db_pool: asyncpg.Pool, site_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old, open_set = site_world.sets["old"], site_world.sets["open"]
    assert '<progress value="4" max="4">' in await html(site, f"/sets/{old}")
    assert '<progress value="4" max="6">' in await html(site, f"/sets/{open_set}")
    state_before = await (await site.get("/state.txt")).text()
    async with open_storage(site_settings) as storage:
        for set_id in (old, open_set):  # a late run in each (requeued, say) settles
            await add_run(db_pool, storage, source_path="sources/us/ca/late.json",
                          set_id=set_id, status="failure", problem="timeout")
    # Within the open set's few seconds, both pages say what they said.
    assert '<progress value="4" max="6">' in await html(site, f"/sets/{open_set}")
    assert await (await site.get("/state.txt")).text() == state_before
    # Later: the set in progress is counted again; the finished one stays as counted.
    later = cache.monotonic() + cache.OPEN_SET_MAX_AGE_S + 1
    monkeypatch.setattr(cache, "monotonic", lambda: later)
    assert '<progress value="5" max="7">' in await html(site, f"/sets/{open_set}")
    assert "<code>timeout</code> (1)" in await html(site, f"/sets/{open_set}")
    finished = await html(site, f"/sets/{old}")
    assert '<progress value="4" max="4">' in finished and "timeout" not in finished.split(
        "<h2>Runs")[0]


async def test_regression_warnings_show_on_set_job_and_source_pages(
    site: Client, site_world: World, db_pool: asyncpg.Pool
) -> None:
    runs = site_world.runs
    said = "regression warning: features 1,000 → 800 (-20%)"
    # The set's run that the dequeuer warned about (site_data marks it as the dequeuer does).
    set_page = await html(site, f"/sets/{site_world.sets['open']}")
    warned_row = set_page[set_page.index(f'id="run-{runs["set_regression"]}"'):]
    assert said in warned_row[:warned_row.index("</tr>")]
    source_page = await html(site, "/sources/us/ks/lane")
    assert said in source_page
    run_page = await html(site, f"/runs/{runs['set_regression']}")
    assert 'id="run-warning">Regression warning: features 1,000 → 800 (-20%).' in run_page
    api = await site.get(f"/api/runs/{runs['set_regression']}")
    assert (await api.json())["warning"] == "features 1,000 → 800 (-20%)"
    # A job's run with a warning (a pull request's: not published, so nothing else changes).
    await db_pool.execute("UPDATE runs SET warning = 'features 120 → 12 (-90%)' WHERE id = $1",
                          runs["pr_good"])
    job_page = await html(site, f"/jobs/{site_world.jobs['pr']}")
    good_row = job_page[job_page.index(f'id="run-{runs["pr_good"]}"'):]
    assert "regression warning: features 120 → 12 (-90%)" in good_row[:good_row.index("</tr>")]
    # Runs without one say nothing of it.
    failed_row = job_page[job_page.index(f'id="run-{runs["pr_failed"]}"'):]
    assert "regression warning" not in failed_row[:failed_row.index("</tr>")]

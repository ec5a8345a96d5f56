"""The job page, loaded by a real headless browser."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import asyncpg
from aiohttp.test_utils import TestServer

from services.webhook.app import create_app
from shared.config import Settings
from tests.support.browser import dump_dom, screenshot


async def _job_with_runs(pool: asyncpg.Pool) -> int:
    job_id: int = await pool.fetchval(
        "INSERT INTO jobs (delivery_id, event, repo, sha, ref, status, finished_at)"
        " VALUES ('d-1', 'push', 'openaddresses/openaddresses', $1, 'refs/heads/main',"
        " 'failure', now()) RETURNING id",
        "a" * 40,
    )
    await pool.execute(
        """
        INSERT INTO runs (job_id, source_path, layer, entry_name, commit_sha, status,
                          source_problem, error, outputs, state, started_at, finished_at)
        VALUES ($1, 'sources/us/ks/lane.json', 'addresses', 'county', $2, 'success', NULL,
                NULL, '{"out.csv": "runs/1/out.csv"}', '{"feature count": 1234}', now(), now()),
               ($1, 'sources/us/ks/gone.json', 'addresses', 'city', $2, 'failure',
                'download_failed', 'GET http://example.org/gone.csv: HTTP 404 <script>x</script>',
                '{}', '{}', now(), now())
        """,
        job_id, "a" * 40,
    )
    return job_id


async def test_job_page_shows_runs_in_a_browser(
    settings: Settings, db_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    job_id = await _job_with_runs(db_pool)
    app = create_app(settings.model_copy(update={"webhook_secrets": []}))
    async with TestServer(app, host="127.0.0.1") as server:
        url = str(server.make_url(f"/jobs/{job_id}"))
        dom = await dump_dom(url)
        shot = await screenshot(url, tmp_path / "job.png")
        if keep := os.environ.get("OA_KEEP_SCREENSHOT"):  # to look at it by hand
            shutil.copy(shot, keep)
    assert f"<h1>Job {job_id}</h1>" in dom
    assert 'id="job-status">failure<' in dom
    assert "sources/us/ks/lane.json" in dom and "sources/us/ks/gone.json" in dom
    assert "1,234" in dom  # features with thousands separators
    assert "download_failed" in dom
    # Error text from a provider is shown as text, never run as markup.
    assert "&lt;script&gt;x&lt;/script&gt;" in dom and "<script>x</script>" not in dom
    assert 'href="/runs/' in dom and "out.csv</a>" in dom
    assert shot.stat().st_size > 5000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

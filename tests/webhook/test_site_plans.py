"""Every query the site runs (``views/sql.py``'s catalogue) is served by an index: none reads
``runs`` with a sequential scan, at the size the issue names: 1,000,000 runs.

The data is the site benchmark's (``bench/bench_site.py``: :func:`seed`, :func:`samples`,
:func:`explain_all`), at the benchmark's own size (1,000,000 runs of 3,000 sources, 200 sets
and the rest in jobs; about 2.5 GB, 70–170 s to seed on a 2-core machine), in a database of
this module's own, dropped at the end, after ``VACUUM ANALYZE`` so that the planner sees the
table as it is. The planner runs as configured (``enable_seqscan`` on, real statistics,
nothing faked), so a query that has no index to use, or whose index is worse than reading the
table, fails here.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from bench.bench_site import VIEWS, explain_all, runs_scans, samples, seed, sequential
from services.webhook.views.sql import CATALOGUE
from shared.db import migrate
from tests.conftest import POSTGRES_SERVER_URL

RUNS, SOURCES, SETS = 1_000_000, 3_000, 200


@pytest.fixture(scope="module")
async def seeded() -> AsyncIterator[asyncpg.Connection]:
    server = POSTGRES_SERVER_URL.rstrip("/")
    name = f"oa_test_plans_{uuid.uuid4().hex[:10]}"
    url = f"{server}/{name}"
    admin = await asyncpg.connect(f"{server}/postgres")
    try:
        await migrate(url)
        conn = await asyncpg.connect(url)
        try:
            made = await seed(conn, runs=RUNS, sources=SOURCES, sets=SETS, say=lambda _: None)
            await conn.execute("VACUUM ANALYZE")
            assert made["runs"] >= RUNS * 0.95, made
            yield conn
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_no_query_of_the_site_scans_runs(seeded: asyncpg.Connection) -> None:
    assert VIEWS  # the view modules are imported: their queries are in the catalogue
    assert await seeded.fetchval("SHOW enable_seqscan") == "on"
    values = await samples(seeded)
    missing = {name for query in CATALOGUE.values() for name in query.sample} - set(values)
    assert not missing, f"no sample value for {missing}"
    plans = await explain_all(seeded, values)
    assert set(plans) == set(CATALOGUE)
    # Lists page by keyset: no query skips rows it has read.
    assert not [name for name, query in CATALOGUE.items() if "OFFSET" in query.text.upper()]
    assert sequential(plans) == [], {name: plans[name] for name in sequential(plans)}
    # The lists and pages that read runs do read it, through an index.
    for name in ("api.runs", "sets.runs", "sources.runs", "jobs.runs", "runs.one",
                 "tallies.sets", "state.rows", "sources.chart"):
        assert plans[name] and all("Scan" in scan for scan in plans[name]), (name, plans[name])


async def test_the_check_finds_a_sequential_scan(seeded: asyncpg.Connection) -> None:
    """The check itself: a query on a column without an index is caught."""
    scans = await runs_scans(seeded, "SELECT id FROM runs WHERE worker = $1", "worker-3")
    assert sequential({"unindexed": scans}) == ["unindexed"], scans
    indexed = await runs_scans(seeded, "SELECT id FROM runs WHERE id = $1", 5)
    assert sequential({"indexed": indexed}) == [], indexed

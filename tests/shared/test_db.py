"""shared.db against the real PostgreSQL server."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from structlog.testing import capture_logs

from shared.db import (
    close_pool,
    create_pool,
    database_name,
    ensure_database,
    load_migrations,
    migrate,
    warm_pool,
)

from ..conftest import POSTGRES_SERVER_URL

TABLES = {"jobs", "sets", "runs", "workers", "schema_migrations"}


@pytest.fixture
async def scratch_url() -> AsyncIterator[str]:
    """The URL of a database that does not exist yet; dropped after the test."""
    server = POSTGRES_SERVER_URL.rstrip("/")
    name = f"oa_scratch_{uuid.uuid4().hex[:12]}"
    yield f"{server}/{name}"
    conn = await asyncpg.connect(f"{server}/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _tables(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {row["tablename"] for row in rows}
    finally:
        await conn.close()


async def _database_exists(name: str) -> bool:
    conn = await asyncpg.connect(f"{POSTGRES_SERVER_URL.rstrip('/')}/postgres")
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()


def test_migrations_are_numbered_in_order() -> None:
    versions = [migration.version for migration in load_migrations()]
    assert versions[0] == "0001"
    assert versions == sorted(versions)


async def test_ensure_database_creates_a_missing_database(scratch_url: str) -> None:
    name = database_name(scratch_url)
    assert not await _database_exists(name)
    await ensure_database(scratch_url)
    assert await _database_exists(name)
    await ensure_database(scratch_url)  # already there: no error
    assert await _database_exists(name)


async def test_migrate_twice_is_idempotent(scratch_url: str) -> None:
    first = await migrate(scratch_url)
    second = await migrate(scratch_url)
    assert first == [migration.version for migration in load_migrations()]
    assert second == []
    assert TABLES <= await _tables(scratch_url)


async def test_concurrent_migrations_on_a_fresh_database(scratch_url: str) -> None:
    results = await asyncio.gather(*(migrate(scratch_url) for _ in range(3)))
    # Exactly one caller applied each migration; the others waited on the lock, found
    # nothing to do, and did not fail.
    applied = sorted(version for result in results for version in result)
    assert applied == [migration.version for migration in load_migrations()]
    assert sum(1 for result in results if result) == 1
    conn = await asyncpg.connect(scratch_url)
    try:
        count = await conn.fetchval("SELECT count(*) FROM schema_migrations")
    finally:
        await conn.close()
    assert count == len(load_migrations())
    assert TABLES <= await _tables(scratch_url)


async def test_jsonb_round_trip(db_pool: asyncpg.Pool) -> None:
    state = {"stage": "conform", "counts": {"rows": 12, "dropped": 0}, "tags": ["a", None, 1.5]}
    job_id = await db_pool.fetchval(
        "INSERT INTO jobs (event, repo, sha, state) VALUES ('push', 'o/r', 'abc', $1) RETURNING id",
        state,
    )
    assert await db_pool.fetchval("SELECT state FROM jobs WHERE id = $1", job_id) == state
    # The default is an empty object, decoded as a dict.
    run_id = await db_pool.fetchval(
        "INSERT INTO runs (job_id, source_path, layer, entry_name, source) "
        "VALUES ($1, 'sources/us/ca/x.json', 'addresses', 'city', $2) RETURNING id",
        job_id,
        {"schema": 2},
    )
    row = await db_pool.fetchrow(
        "SELECT outputs, state, source, attempt FROM runs WHERE id = $1", run_id
    )
    assert row is not None
    assert (row["outputs"], row["state"], row["source"], row["attempt"]) == (
        {},
        {},
        {"schema": 2},
        1,
    )


async def test_tables_are_truncated_between_tests(db_pool: asyncpg.Pool) -> None:
    # The previous test inserted a job; identities restart too.
    assert await db_pool.fetchval("SELECT count(*) FROM jobs") == 0
    job_id = await db_pool.fetchval(
        "INSERT INTO jobs (event, repo, sha) VALUES ('push', 'o/r', 'abc') RETURNING id"
    )
    assert job_id == 1


async def test_constraints(db_pool: asyncpg.Pool) -> None:
    await db_pool.execute(
        "INSERT INTO jobs (delivery_id, event, repo, sha) VALUES ('d-1', 'push', 'o/r', 'abc')"
    )
    with pytest.raises(asyncpg.UniqueViolationError):
        await db_pool.execute(
            "INSERT INTO jobs (delivery_id, event, repo, sha) VALUES ('d-1', 'push', 'o/r', 'b')"
        )
    with pytest.raises(asyncpg.CheckViolationError):
        await db_pool.execute(
            "INSERT INTO jobs (event, repo, sha, status) VALUES ('push', 'o/r', 'c', 'pending')"
        )
    with pytest.raises(asyncpg.CheckViolationError):
        await db_pool.execute(
            "INSERT INTO runs (source_path, layer, entry_name, status) "
            "VALUES ('s.json', 'addresses', 'e', 'error')"
        )


async def test_warm_pool_opens_its_connections_and_keeps_them(database_url: str) -> None:
    pool = await create_pool(database_url, min_size=0, max_size=4, keep_idle=True)
    try:
        assert pool.get_size() == 0
        await warm_pool(pool, 4)
        # Four connections open and idle: a burst of four queries connects nothing.
        assert pool.get_size() == 4 and pool.get_idle_size() == 4
        assert await pool.fetchval("SELECT 1") == 1 and pool.get_size() == 4
    finally:
        await pool.close()


async def test_warm_pool_waits_for_postgresql_to_answer() -> None:
    # Nothing listens on this port: the warming waits (an outage) instead of failing.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pool = await create_pool(f"postgresql://postgres@127.0.0.1:{port}/x", min_size=0,
                             max_size=2)
    try:
        warming = asyncio.create_task(warm_pool(pool, 2))
        await asyncio.sleep(1.5)
        assert not warming.done()
        warming.cancel()
        with pytest.raises(asyncio.CancelledError):
            await warming
    finally:
        await pool.close()


async def test_closing_a_pool_does_not_wait_forever_for_a_connection_still_held(
    database_url: str,
) -> None:
    pool = await create_pool(database_url, min_size=1, max_size=2)
    held = await pool.acquire()  # a task that never gives it back
    with capture_logs() as forced:
        await asyncio.wait_for(close_pool(pool, timeout_s=0.5), 10)
    assert [e["waited_s"] for e in forced if e["event"] == "db.pool_terminated"] == [0.5]
    assert pool.is_closing()
    with pytest.raises(asyncpg.InterfaceError):  # closed under the task that held it
        await held.fetchval("SELECT 1")
    # Given back in time, nothing is forced.
    pool = await create_pool(database_url, min_size=1, max_size=2)
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT 1") == 1
    with capture_logs() as logs:
        await close_pool(pool, timeout_s=5)
    assert pool.is_closing() and not [e for e in logs if e["event"] == "db.pool_terminated"]

"""Scheduler leadership: one PostgreSQL advisory lock, held by one connection at a time."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg

from services.scheduler.leader import LEADER_LOCK_KEY, acquire_leadership, holds_leadership
from services.scheduler.service import serve
from shared.config import Settings

POLL_S = 0.05


async def settle_briefly() -> None:
    # Long enough for many polls of the waiting side.
    await asyncio.sleep(0.5)


async def test_second_connection_waits_until_the_first_closes(database_url: str) -> None:
    first = await asyncpg.connect(database_url)
    second = await asyncpg.connect(database_url)
    try:
        await asyncio.wait_for(acquire_leadership(first, poll_s=POLL_S), 5)
        assert await holds_leadership(first) is True
        waiting = asyncio.create_task(acquire_leadership(second, poll_s=POLL_S))
        await settle_briefly()
        assert not waiting.done()
        assert await holds_leadership(second) is False
        assert await holds_leadership(first) is True

        await first.close()
        await asyncio.wait_for(waiting, 5)
        assert await holds_leadership(second) is True
    finally:
        for conn in (first, second):
            if not conn.is_closed():
                await conn.close()


async def test_a_dropped_leader_connection_hands_over(database_url: str) -> None:
    leader = await asyncpg.connect(database_url)
    replica = await asyncpg.connect(database_url)
    admin = await asyncpg.connect(database_url)
    try:
        await acquire_leadership(leader, poll_s=POLL_S)
        waiting = asyncio.create_task(acquire_leadership(replica, poll_s=POLL_S))
        await settle_briefly()
        assert not waiting.done()
        # The leader's backend dies (a network cut, a crashed pod): PostgreSQL frees the lock.
        assert await admin.fetchval("SELECT pg_terminate_backend($1)",
                                    leader.get_server_pid()) is True
        await asyncio.wait_for(waiting, 10)
        assert await holds_leadership(replica) is True
    finally:
        for conn in (leader, replica, admin):
            with contextlib.suppress(Exception):
                await conn.close()


async def test_serve_in_burst_mode_waits_for_the_lock_then_returns(
    settings: Settings, database_url: str
) -> None:
    holder = await asyncpg.connect(database_url)
    try:
        await acquire_leadership(holder, poll_s=POLL_S)
        first = asyncio.create_task(serve(settings, burst=True, poll_s=POLL_S))
        await asyncio.sleep(1.0)  # migrate() and connect take a moment; then it polls
        assert not first.done(), "serve() led while another connection held the lock"
        await holder.close()
        await asyncio.wait_for(first, 10)
    finally:
        if not holder.is_closed():
            await holder.close()

    # serve() closed its connection on return, so the lock is free for the next one.
    await asyncio.wait_for(serve(settings, burst=True, poll_s=POLL_S), 10)
    check = await asyncpg.connect(database_url)
    try:
        await asyncio.wait_for(acquire_leadership(check, poll_s=POLL_S), 5)
    finally:
        await check.close()


async def test_two_serves_in_burst_mode_lead_one_after_the_other(
    settings: Settings, database_url: str
) -> None:
    holder = await asyncpg.connect(database_url)
    try:
        await acquire_leadership(holder, poll_s=POLL_S)
        both = [asyncio.create_task(serve(settings, burst=True, poll_s=POLL_S))
                for _ in range(2)]
        await asyncio.sleep(1.0)
        assert not any(task.done() for task in both)
    finally:
        await holder.close()
    await asyncio.wait_for(asyncio.gather(*both), 10)


async def test_a_leading_serve_keeps_the_lock_until_cancelled(
    settings: Settings, database_url: str
) -> None:
    leading = asyncio.create_task(serve(settings, poll_s=POLL_S))
    other = await asyncpg.connect(database_url)
    try:
        # Wait until serve() leads: the lock is then taken by someone else.
        for _ in range(100):
            # The leader key, not migrate()'s own advisory lock.
            if await other.fetchval(
                # This test's database only: a scheduler of `make run` may lead elsewhere.
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND objid = $1::bigint % 4294967296 AND database = (SELECT oid FROM"
                " pg_database WHERE datname = current_database())", LEADER_LOCK_KEY,
            ):
                break
            await asyncio.sleep(POLL_S)
        waiting = asyncio.create_task(acquire_leadership(other, poll_s=POLL_S))
        await settle_briefly()
        assert not waiting.done() and not leading.done()
        leading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await leading
        await asyncio.wait_for(waiting, 5)
        assert await holds_leadership(other) is True
    finally:
        leading.cancel()
        await other.close()


async def test_a_leading_serve_is_not_confused_by_a_leader_of_another_database(
    settings: Settings, database_url: str
) -> None:
    # `make run` (or another checkout) on the same server: its scheduler leads in its own
    # database, holding the same key. Ours leads in ours all the same, and the checks above
    # see only ours.
    from tests.conftest import POSTGRES_SERVER_URL

    other_name = f"{database_url.rsplit('/', 1)[1]}_other"
    admin = await asyncpg.connect(f"{POSTGRES_SERVER_URL.rstrip('/')}/postgres")
    await admin.execute(f'CREATE DATABASE "{other_name}"')
    elsewhere = await asyncpg.connect(f"{POSTGRES_SERVER_URL.rstrip('/')}/{other_name}")
    ours = await asyncpg.connect(database_url)
    try:
        await asyncio.wait_for(acquire_leadership(elsewhere, poll_s=POLL_S), 5)
        await asyncio.wait_for(acquire_leadership(ours, poll_s=POLL_S), 5)
        assert await holds_leadership(ours) is True
        assert await ours.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND objid = $1::bigint % 4294967296 AND database = (SELECT oid FROM"
            " pg_database WHERE datname = current_database())", LEADER_LOCK_KEY,
        ) == 1
    finally:
        await ours.close()
        await elsewhere.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{other_name}" WITH (FORCE)')
        await admin.close()

"""One scheduler leads at a time: a PostgreSQL advisory lock held on a dedicated connection.

If the leader's connection drops, PostgreSQL releases the lock and a waiting replica takes over.
"""

from __future__ import annotations

import asyncio
from typing import Final

import asyncpg

#: Arbitrary but fixed: the key every scheduler replica contends for.
LEADER_LOCK_KEY: Final = 0x0A_5C_4ED


async def acquire_leadership(conn: asyncpg.Connection, *, poll_s: float = 5.0) -> None:
    """Wait until this connection holds the leader lock."""
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK_KEY):
        await asyncio.sleep(poll_s)


async def holds_leadership(conn: asyncpg.Connection) -> bool:
    """Whether this connection still holds the leader lock."""
    return bool(
        await conn.fetchval(
            """
            SELECT count(*) > 0 FROM pg_locks
            WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
              AND objid = $1::bigint % 4294967296
            """,
            LEADER_LOCK_KEY,
        )
    )

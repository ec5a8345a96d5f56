"""PostgreSQL: database creation, versioned migrations and the connection pool (asyncpg).

Migrations are the files ``shared/migrations/NNNN_name.sql``, applied in order of their number,
each in its own transaction and recorded in ``schema_migrations``. :func:`migrate` holds a
session-level advisory lock while it works, so every service can call it at start-up: when two
processes start at once, the second waits for the first and then finds nothing left to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg
import structlog

from shared.outage import Backoff, is_outage

log = structlog.get_logger(__name__)

#: Arbitrary constant shared by every process of oa-machine: "the migration lock".
MIGRATION_LOCK_ID = 0x0A_0A_0001

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    """One migration file: ``version`` is its 4-digit number as text ("0001")."""

    version: str
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """Every migration bundled with the package, in the order they must be applied."""
    folder = resources.files("shared").joinpath("migrations")
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match is None:
            continue
        found.append(Migration(match.group(1), entry.name, entry.read_text(encoding="utf-8")))
    found.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a number: {versions}")
    return found


def database_name(url: str) -> str:
    """The database named in a ``postgresql://`` URL."""
    name = unquote(urlsplit(url).path.lstrip("/"))
    if not name:
        raise ValueError(f"no database name in {url!r}")
    return name


def _maintenance_url(url: str) -> str:
    # Same server, user and options; only the database changes to the always-present one.
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/postgres"))


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def ensure_database(url: str) -> None:
    """Create the database named in ``url`` if it does not exist.

    Connects to the ``postgres`` database of the same server. Safe when several processes race
    to create it: losing the race (``DuplicateDatabaseError``) counts as success.
    """
    name = database_name(url)
    try:
        # Fast path: the database is usually there already and the user may not be allowed
        # to connect to `postgres`.
        conn = await asyncpg.connect(url)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return
    conn = await asyncpg.connect(_maintenance_url(url))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists:
            return
        try:
            await conn.execute(f"CREATE DATABASE {_quote_ident(name)}")
            log.info("db.created", database=name)
        except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
            # Another process created it between our check and our CREATE; the unique
            # violation is what PostgreSQL raises when both CREATEs run at the same instant.
            pass
    finally:
        await conn.close()


async def migrate(url: str) -> list[str]:
    """Create the database if needed and apply every pending migration.

    Idempotent; returns the versions applied by this call (empty when up to date).
    """
    await ensure_database(url)
    migrations = load_migrations()
    applied_now: list[str] = []
    conn = await asyncpg.connect(url)
    try:
        # A session-level lock (not a transaction-level one) because each migration commits
        # on its own and the lock must cover all of them.
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
        try:
            await conn.execute(
                """
                CREATE TABLE IF NOT EXISTS schema_migrations (
                    version    text PRIMARY KEY,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )
                """
            )
            rows = await conn.fetch("SELECT version FROM schema_migrations")
            done = {row["version"] for row in rows}
            for migration in migrations:
                if migration.version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version) VALUES ($1)", migration.version
                    )
                applied_now.append(migration.version)
                log.info("db.migrated", version=migration.version, name=migration.name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    finally:
        await conn.close()
    return applied_now


async def init_connection(conn: asyncpg.Connection) -> None:
    """Give a connection the codecs every pool connection has (json/jsonb as Python values)."""
    # Without codecs asyncpg hands json/jsonb over as text; with them Python values go in and
    # come out, and every service sees the same shapes.
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


#: Longest wait for a new connection; past it the attempt fails like a refused one.
CONNECT_TIMEOUT_S = 10.0


class PoolConnection(asyncpg.Connection):
    """A pooled connection that is not reset when it goes back to the pool.

    asyncpg sends ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` on every
    release: one more round trip per query on a pool, which on these machines (where each
    socket write is a slow system call) was a fifth of the webhook's time per delivery. No code
    of ours leaves session state on a pooled connection: advisory locks (migrations, the
    scheduler's leadership) and LISTEN are taken on dedicated connections, SET is not used,
    and transactions are always closed (asyncpg still rolls back an open one on release).
    """

    def get_reset_query(self) -> str:
        return ""


#: How long closing a pool waits for its connections to be given back before closing them.
POOL_CLOSE_S = 10.0


async def close_pool(pool: asyncpg.Pool, timeout_s: float = POOL_CLOSE_S) -> None:
    """Close ``pool`` on a service's way out: its connections are given back and closed, but
    a connection still held after ``timeout_s`` (a task that did not stop) is closed anyway,
    so that stopping never hangs on it."""
    try:
        await asyncio.wait_for(pool.close(), timeout_s)
    except TimeoutError:
        log.warning("db.pool_terminated", waited_s=timeout_s)
        pool.terminate()


async def create_pool(url: str, *, min_size: int = 1, max_size: int = 10,
                      keep_idle: bool = False) -> asyncpg.Pool:
    """A connection pool on ``url``; its connections encode and decode json/jsonb as Python
    values (``json.dumps`` / ``json.loads``), so pass dicts and lists directly.

    With ``min_size=0`` nothing connects until the first query, so a service can start while
    PostgreSQL is down; a query then fails with an outage (:func:`shared.outage.is_outage`)
    until it is back, and the pool replaces connections the server dropped. ``keep_idle``
    keeps connections open however long they are idle (asyncpg closes them after 5 minutes
    otherwise), for a service whose bursts must not wait for new connections (see
    :func:`warm_pool`).
    """
    pool: asyncpg.Pool = await asyncpg.create_pool(
        url, min_size=min_size, max_size=max_size, init=init_connection,
        timeout=CONNECT_TIMEOUT_S, connection_class=PoolConnection,
        max_inactive_connection_lifetime=0 if keep_idle else 300.0,
    )
    return pool


async def warm_pool(pool: asyncpg.Pool, size: int) -> None:
    """Open ``size`` connections of ``pool`` as soon as PostgreSQL answers (waiting out an
    outage), so that the first burst of queries does not pay for connecting: a new connection
    costs several round trips (start-up, authentication, the codecs' type lookups) and, in a
    burst of 50 webhook deliveries, was half of the time to answer them."""
    backoff = Backoff(first_s=1.0, max_s=30.0)
    while True:
        try:
            async with contextlib.AsyncExitStack() as held:
                for _ in range(size):
                    await held.enter_async_context(pool.acquire())
            return
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.info("db.warm_waiting", error=repr(exc))
            await backoff.wait()

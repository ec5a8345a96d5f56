"""Real-service fixtures for the whole suite: PostgreSQL, RabbitMQ, an S3 API server.

* ``database_url`` (session): a fresh, migrated database ``oa_test_<hex>``, dropped at the end.
  ``db_pool`` (per test): a pool on it, every table truncated first.
* ``amqp_url`` (session): a fresh RabbitMQ virtual host ``oa-test-<hex>`` (``rabbitmqctl``),
  deleted at the end. ``broker`` (per test): a connected :class:`Broker`, queues purged.
* ``s3_server`` (session): moto's S3 server on 127.0.0.1 over real HTTP; ``s3_storage`` (per
  test) on a fresh bucket; ``local_storage`` (per test) on ``tmp_path``.
* ``settings`` (per test): :class:`Settings` pointing at all of the above.

The servers default to the local ones; ``OA_TEST_POSTGRES_URL`` (server URL without a
database) and ``OA_TEST_AMQP_URL`` (without a virtual host) point elsewhere.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import asyncpg
import pytest
import pytest_asyncio

from shared.broker import Broker
from shared.config import Settings
from shared.db import create_pool, migrate
from shared.storage import LocalStorage, S3Storage
from shared.topology import TOPOLOGY

# Servers of a test module's own, for the tests that stop, kill and restart them (fault tests).
from tests.support.fault_fixtures import (  # noqa: F401  (fixtures, used by name)
    own_database_url,
    own_postgres,
    own_rabbitmq,
    service_processes,
)
from tests.support.prerequisites import missing, needs_of

POSTGRES_SERVER_URL = os.environ.get("OA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
AMQP_SERVER_URL = os.environ.get("OA_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")
#: pytest's exit status when the machine lacks something the collected tests need (pytest's own
#: statuses are 0 to 5).
MISSING_PREREQUISITE = 6


def _port_open(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 3
        ):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- What the machine must have ----------------------------------------------------------------


def pytest_collection_finish(session: pytest.Session) -> None:
    """Before the first test: one line per missing prerequisite of the collected tests."""
    if session.config.option.collectonly or not session.items:
        return
    needs = needs_of(
        (getattr(item, "fixturenames", ()), getattr(item, "module", None))
        for item in session.items
    )
    lines = missing(needs, postgres_url=POSTGRES_SERVER_URL, amqp_url=AMQP_SERVER_URL)
    if lines:
        pytest.exit("\n".join(lines), returncode=MISSING_PREREQUISITE)


# --- PostgreSQL -------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="session")
async def database_url() -> AsyncIterator[str]:
    """A fresh migrated database for the test session; dropped afterwards."""
    server = POSTGRES_SERVER_URL.rstrip("/")
    try:
        conn = await asyncpg.connect(f"{server}/postgres", timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {server} ({exc!r}); start it or set "
            "OA_TEST_POSTGRES_URL",
            pytrace=False,
        )
    name = f"oa_test_{uuid.uuid4().hex[:12]}"
    url = f"{server}/{name}"
    try:
        await migrate(url)
        yield url
    finally:
        # FORCE: a test that leaked a connection must not leave the database behind.
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


@pytest_asyncio.fixture
async def db_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the session database, every table (but schema_migrations) emptied first."""
    pool = await create_pool(database_url, min_size=1, max_size=5)
    try:
        async with pool.acquire() as conn:
            tables = await conn.fetch(
                "SELECT quote_ident(tablename) AS name FROM pg_tables "
                "WHERE schemaname = 'public' AND tablename <> 'schema_migrations'"
            )
            if tables:
                names = ", ".join(row["name"] for row in tables)
                await conn.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
        yield pool
    finally:
        await pool.close()


# --- RabbitMQ ---------------------------------------------------------------------------------


def _rabbitmqctl(*args: str) -> None:
    result = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip()}")


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """A fresh RabbitMQ virtual host for the test session; deleted afterwards."""
    if not _port_open(AMQP_SERVER_URL, 5672):
        pytest.fail(
            f"RabbitMQ is not reachable at {AMQP_SERVER_URL}; start it or set OA_TEST_AMQP_URL",
            pytrace=False,
        )
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is not on PATH: it creates the per-session vhost", pytrace=False)
    vhost = f"oa-test-{uuid.uuid4().hex[:12]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"{AMQP_SERVER_URL.rstrip('/')}/{quote(vhost, safe='')}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


@pytest_asyncio.fixture
async def broker(amqp_url: str) -> AsyncIterator[Broker]:
    """A connected broker with the topology declared and every queue empty."""
    connected = await Broker.connect(amqp_url)
    try:
        for queue in TOPOLOGY:
            await connected.purge(queue)
        yield connected
    finally:
        await connected.close()


# --- S3 and local storage ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 API server on 127.0.0.1 (real HTTP); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    with pytest.MonkeyPatch.context() as patch:
        # Fake credentials, so no test can ever reach a real AWS account.
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.setenv("AWS_REGION", "us-east-1")
        for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE"):
            patch.delenv(name, raising=False)
        server.start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop()


@pytest_asyncio.fixture
async def s3_storage(s3_server: str) -> AsyncIterator[S3Storage]:
    """S3 storage on a fresh bucket of the moto server."""
    storage = S3Storage(f"oa-test-{uuid.uuid4().hex[:12]}", "prefix", endpoint_url=s3_server)
    await storage.create_bucket()
    try:
        yield storage
    finally:
        await storage.close()


@pytest.fixture
def local_storage(tmp_path: Path) -> LocalStorage:
    """Local-directory storage under the test's tmp_path."""
    root = tmp_path / "storage"
    root.mkdir()
    return LocalStorage(root)


# --- Settings ---------------------------------------------------------------------------------


@pytest.fixture
def settings(database_url: str, amqp_url: str, tmp_path: Path) -> Settings:
    """Settings for the real services above, local storage in tmp_path, private URLs allowed."""
    storage_dir = tmp_path / "storage-settings"
    storage_dir.mkdir()
    return Settings(
        database_url=database_url,
        amqp_url=amqp_url,
        storage_url=storage_dir.as_uri(),
        s3_endpoint_url=None,
        github_token=None,
        allow_private_urls=True,
        work_dir=tmp_path / "work",
        # Free ports: tests run beside `make run` (8080, 9100...) and beside each other.
        http_port=_free_port(),
        metrics_port=0,
    )

"""Pytest fixtures for fault tests; ``tests/conftest.py`` imports them, so every test can ask
for them by name.

* ``own_postgres`` (module): a started :class:`PostgresServer` of the module's own, closed
  (stopped, files removed) at the end. Tests may stop, kill and restart it; one that leaves it
  down should say so, or the next test calls ``own_postgres.start()`` (a no-op when running).
* ``own_rabbitmq`` (module): the same for a :class:`RabbitServer` (a start takes 5-10 s).
* ``own_database_url`` (module): a fresh migrated database on ``own_postgres``;
  ``await own_postgres.migrated_database()`` makes more.
* ``service_processes`` (per test): a :class:`ServiceProcesses` whose logs go under the
  test's ``tmp_path``; every process it started is stopped at the end, failing test or not.

A machine without the PostgreSQL or RabbitMQ binaries (servers in containers) skips these
tests: they cannot run there, whereas the rest of the suite can.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.support.processes import ServiceProcesses
from tests.support.servers import (
    PostgresServer,
    RabbitServer,
    ServerError,
    find_postgres_bin_dir,
    find_rabbitmq_scripts_dir,
)

__all__ = [
    "own_database_url",
    "own_postgres",
    "own_rabbitmq",
    "service_processes",
]


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this module's own, on a free port, started."""
    try:
        find_postgres_bin_dir()
    except ServerError as exc:
        pytest.skip(f"fault tests need local PostgreSQL binaries: {exc}")
    with PostgresServer() as server:
        server.start()
        yield server


@pytest.fixture(scope="module")
def own_rabbitmq() -> Iterator[RabbitServer]:
    """A RabbitMQ node of this module's own, on free ports, started."""
    try:
        find_rabbitmq_scripts_dir()
    except ServerError as exc:
        pytest.skip(f"fault tests need a local RabbitMQ installation: {exc}")
    with RabbitServer() as server:
        server.start()
        yield server


@pytest_asyncio.fixture(scope="module")
async def own_database_url(own_postgres: PostgresServer) -> AsyncIterator[str]:
    """A fresh migrated database on ``own_postgres``."""
    own_postgres.start()
    yield await own_postgres.migrated_database()


@pytest.fixture
def service_processes(tmp_path: Path) -> Iterator[ServiceProcesses]:
    """Starts service processes for one test and stops every one of them afterwards."""
    processes = ServiceProcesses(tmp_path / "service-logs")
    try:
        yield processes
    finally:
        processes.close()
        for process in processes.started:
            # Shown by pytest with a failing test's captured output.
            print(f"{process.name}: exit {process.returncode}, log {process.log_path}")

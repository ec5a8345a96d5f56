"""Fixtures of the fault tests: a whole system per test on servers of the module's own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from services.demo.github import GitHubStandIn
from tests.faults.harness import ROWS, System, new_vhost
from tests.support.dataserver import DataServer
from tests.support.processes import ServiceProcesses
from tests.support.servers import PostgresServer, RabbitServer


@pytest_asyncio.fixture
async def system(
    own_postgres: PostgresServer,
    own_rabbitmq: RabbitServer,
    service_processes: ServiceProcesses,
    tmp_path: Path,
) -> AsyncIterator[System]:
    """Fresh database, virtual host, storage, GitHub and data provider; no service yet."""
    # A test before may have left a server down on purpose.
    await asyncio.to_thread(own_postgres.start)
    await asyncio.to_thread(own_rabbitmq.start)
    database_url = await own_postgres.migrated_database()
    amqp_url = await new_vhost(own_rabbitmq)
    github = GitHubStandIn()
    await github.start()
    data = DataServer()
    await data.start()
    data.add("/rows.csv", ROWS, content_type="text/csv")
    storage = tmp_path / "storage"
    storage.mkdir()
    try:
        yield System(
            postgres=own_postgres, rabbit=own_rabbitmq, database_url=database_url,
            amqp_url=amqp_url, storage_dir=storage, work_root=tmp_path / "work",
            processes=service_processes, github=github, data=data,
        )
    finally:
        # Services first (they would log connection errors otherwise), then the stand-ins.
        await asyncio.to_thread(service_processes.close)
        await data.close()
        await github.stop()

"""The fault-test infrastructure: own servers that stop, die and come back; services as processes.

The servers here are this module's own (``tests/support/servers.py``); the last test checks
that the shared PostgreSQL and RabbitMQ the rest of the suite uses never noticed.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import uuid

import aio_pika
import asyncpg
import pytest

from tests.conftest import POSTGRES_SERVER_URL
from tests.support.processes import ServiceProcesses
from tests.support.servers import PostgresServer, RabbitServer

SHARED_PORTS = (5432, 5672)


async def _refused(url: str) -> BaseException:
    with pytest.raises(OSError) as caught:
        conn = await asyncpg.connect(url, timeout=5)
        await conn.close()
    return caught.value


# --- PostgreSQL -------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_own_postgres_stops_dies_and_comes_back(own_postgres: PostgresServer) -> None:
    own_postgres.start()
    assert own_postgres.port not in SHARED_PORTS
    url = await own_postgres.migrated_database()
    conn = await asyncpg.connect(url, timeout=5)
    await conn.execute("CREATE TABLE probe (n int)")
    await conn.execute("INSERT INTO probe VALUES (1)")
    assert await conn.fetchval("SELECT count(*) FROM schema_migrations") > 0

    own_postgres.stop()
    assert not own_postgres.is_running
    # The server ended the session (fast shutdown) and nothing listens any more.
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
        await conn.fetchval("SELECT 1")
    await _refused(url)

    own_postgres.start()
    assert own_postgres.is_running
    conn = await asyncpg.connect(url, timeout=5)
    await conn.execute("INSERT INTO probe VALUES (2)")

    # A crash: every process of the server gets SIGKILL, the session just breaks.
    own_postgres.kill()
    assert not own_postgres.is_running
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
        await conn.fetchval("SELECT 1", timeout=5)
    conn.terminate()
    await _refused(url)

    own_postgres.start()
    conn = await asyncpg.connect(url, timeout=5)
    try:
        # Committed rows survive the crash (crash recovery replays the WAL).
        assert await conn.fetchval("SELECT array_agg(n ORDER BY n) FROM probe") == [1, 2]
    finally:
        await conn.close()
    assert "database system was interrupted" in own_postgres.log(200), own_postgres.log()

    own_postgres.restart()
    assert own_postgres.is_running
    conn = await asyncpg.connect(url, timeout=5)
    await conn.close()


@pytest.mark.timeout(60)
async def test_killing_only_the_postmaster_ends_the_sessions(own_postgres: PostgresServer) -> None:
    own_postgres.start()
    conn = await asyncpg.connect(own_postgres.url(), timeout=5)
    own_postgres.kill(whole_server=False)
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
        await conn.fetchval("SELECT 1", timeout=5)
    conn.terminate()
    own_postgres.start()
    conn = await asyncpg.connect(own_postgres.url(), timeout=5)
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()


def test_postgres_close_removes_everything() -> None:
    with PostgresServer() as server:
        server.start()
        root, port = server.root, server.port
        server.kill()  # closing a crashed server is the hard case
    assert not root.exists()
    assert not server.is_running
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), 1).close()


# --- RabbitMQ ---------------------------------------------------------------------------------


async def _publish(url: str, queue_name: str, body: bytes) -> None:
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel()  # publisher confirms on
        await channel.declare_queue(queue_name, durable=True)
        await channel.default_exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue_name,
        )


async def _get(url: str, queue_name: str) -> bytes | None:
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, durable=True)
        message = await queue.get(fail=False, timeout=10)
        if message is None:
            return None
        await message.ack()
        return message.body


async def _disconnected(connection: aio_pika.abc.AbstractConnection) -> None:
    while connection.connected.is_set():
        await asyncio.sleep(0.05)


async def _connection_refused(url: str) -> None:
    with pytest.raises((OSError, aio_pika.exceptions.AMQPError)):
        connection = await aio_pika.connect(url, timeout=5)
        await connection.close()


@pytest.mark.timeout(240)
async def test_own_rabbitmq_stops_dies_and_keeps_durable_messages(
    own_rabbitmq: RabbitServer,
) -> None:
    own_rabbitmq.start()
    assert own_rabbitmq.port not in SHARED_PORTS
    assert own_rabbitmq.node.startswith("oa-test-")
    queue = f"probe-{uuid.uuid4().hex[:8]}"

    await _publish(own_rabbitmq.url, queue, b"one")
    assert await _get(own_rabbitmq.url, queue) == b"one"

    # The application stops (every connection closed), the Erlang VM stays.
    await _publish(own_rabbitmq.url, queue, b"two")
    connection = await aio_pika.connect(own_rabbitmq.url, timeout=10)
    own_rabbitmq.stop_app()
    assert own_rabbitmq.is_running
    await asyncio.wait_for(_disconnected(connection), 10)
    await connection.close()
    await _connection_refused(own_rabbitmq.url)
    own_rabbitmq.start_app()
    assert await _get(own_rabbitmq.url, queue) == b"two"

    # The whole node stops and starts.
    await _publish(own_rabbitmq.url, queue, b"three")
    own_rabbitmq.stop()
    assert not own_rabbitmq.is_running
    await _connection_refused(own_rabbitmq.url)
    own_rabbitmq.start()
    assert await _get(own_rabbitmq.url, queue) == b"three"

    # A crash: a confirmed persistent message is on disk already.
    await _publish(own_rabbitmq.url, queue, b"four")
    own_rabbitmq.kill()
    assert not own_rabbitmq.is_running
    await _connection_refused(own_rabbitmq.url)
    own_rabbitmq.start()
    assert await _get(own_rabbitmq.url, queue) == b"four", own_rabbitmq.log()
    assert await _get(own_rabbitmq.url, queue) is None


# --- services as processes --------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_service_process_runs_the_cli_to_completion(service_processes: ServiceProcesses) -> None:
    process = service_processes.start("help", ["--help"])
    assert process.wait(timeout_s=30) == 0, process.output()
    text = process.output()
    for command in ("webhook", "worker", "dequeuer", "scheduler", "migrate"):
        assert command in text
    assert process.events() == []  # argparse prints text, not JSON
    assert process.env["LOG_FORMAT"] == "json"
    assert process.env["METRICS_PORT"] == "0"
    assert int(process.env["HTTP_PORT"]) not in (0, 8080)
    assert process.log_path.read_text().count("migrate") >= 1


@pytest.mark.timeout(60)
async def test_service_process_migrates_the_own_postgres(
    own_postgres: PostgresServer, service_processes: ServiceProcesses
) -> None:
    own_postgres.start()
    url = own_postgres.url(f"oa_fault_{uuid.uuid4().hex[:12]}")
    process = service_processes.start("migrate", ["migrate"], {"DATABASE_URL": url})
    code = await asyncio.to_thread(process.wait, 45)
    assert code == 0, process.output()
    migrated = process.events("db.migrated")
    assert migrated, process.output()
    assert all(event["level"] == "info" for event in migrated)
    conn = await asyncpg.connect(url, timeout=5)
    try:
        versions = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    assert [row["version"] for row in versions] == [event["version"] for event in migrated]


@pytest.mark.timeout(90)
async def test_service_process_waits_for_events_and_stops_or_dies(
    own_postgres: PostgresServer, service_processes: ServiceProcesses
) -> None:
    own_postgres.start()
    url = await own_postgres.migrated_database()
    scheduler = service_processes.start("scheduler", ["scheduler"], {"DATABASE_URL": url})
    leading = await scheduler.wait_for_event_async("scheduler.leading", timeout_s=45)
    assert leading["service"] == "scheduler"
    assert scheduler.alive
    mark = scheduler.event_count()
    assert scheduler.stop(timeout_s=20) == 0, scheduler.output()
    assert scheduler.wait_for_event("service.stopped", timeout_s=5, since=mark)

    second = service_processes.start("scheduler-2", ["scheduler"], {"DATABASE_URL": url})
    await second.wait_for_event_async("scheduler.leading", timeout_s=45)
    second.kill()
    assert await asyncio.to_thread(second.wait, 10) == -signal.SIGKILL
    assert not second.events("service.stopped")
    with pytest.raises(AssertionError, match="ended"):
        second.wait_for_event("never.logged", timeout_s=5)

    with pytest.raises(AssertionError, match="within"):
        third = service_processes.start("scheduler-3", ["scheduler"], {"DATABASE_URL": url})
        third.wait_for_event("never.logged", timeout_s=0.5)
    # service_processes stops scheduler-3 at the end of the test.


# --- the shared servers ----------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_the_shared_servers_still_answer(amqp_url: str) -> None:
    conn = await asyncpg.connect(f"{POSTGRES_SERVER_URL.rstrip('/')}/postgres", timeout=10)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
    connection = await aio_pika.connect(amqp_url, timeout=10)
    await connection.close()

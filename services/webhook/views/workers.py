"""Workers: ``/workers`` and ``/api/workers``: each worker's state by the Overseer's rule
(active; inactive after ``WORKER_INACTIVE_S`` without a heartbeat; offline after
``WORKER_OFFLINE_S``), version, current run and for how long, last heartbeat; and the depths of
the queues.

The API pages its list by keyset on the workers' names (the table's primary key: unique,
indexed, and never changed by a heartbeat, so a walk neither skips nor repeats a worker); the
counts and the queues are of all, on every page. The page lists every worker at once, most
recently seen first: it is a status board of tens of workers (those seen in the last
``WORKER_FORGET_S``; the dequeuer forgets the others) that refreshes itself every 30 s; paged,
its rows would move between pages as heartbeats arrive."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Any

from aiohttp import web

from services.webhook.keys import BROKER, POOL, SETTINGS
from services.webhook.views.models import Queue, Worker, WorkerRules, Workers, WorkersQuery
from services.webhook.views.params import next_link
from services.webhook.views.render import page
from services.webhook.views.sql import query
from shared.messages import QUEUE_DEAD, QUEUE_DONE, QUEUE_DUE, QUEUE_TASKS

# The status is computed here, from the last heartbeat, rather than read from the column the
# dequeuer updates every 10 s: the page is right to the second. $1 and $2 in every query below.
_STATUS = """CASE WHEN w.last_seen_at < now() - $2::interval THEN 'offline'
                WHEN w.last_seen_at < now() - $1::interval THEN 'inactive'
                ELSE 'active' END"""
_WORKER = f"""
    SELECT w.name, w.hostname, w.pid, w.state, w.run_id, w.started_at, w.last_seen_at,
           w.version, {_STATUS} AS status,
           extract(epoch FROM now() - w.last_seen_at)::float8 AS seen_s_ago,
           extract(epoch FROM now() - r.started_at)::float8 AS running_for_s,
           r.source_path, r.layer, r.entry_name, r.attempt, r.status AS run_status
    FROM workers w LEFT JOIN runs r ON r.id = w.run_id"""

WORKER_LIST = query("workers.list", f"{_WORKER} ORDER BY w.last_seen_at DESC",
                    "inactive_after", "offline_after")
WORKER_PAGE = query("workers.page", f"{_WORKER} WHERE w.name > $3 ORDER BY w.name LIMIT $4",
                    "inactive_after", "offline_after", "after_name", "limit")
WORKER_COUNTS = query("workers.counts", f"""
    SELECT {_STATUS} AS status, count(*)::int AS workers FROM workers w GROUP BY 1
""", "inactive_after", "offline_after")

QUEUES = (QUEUE_TASKS, QUEUE_DONE, QUEUE_DUE, QUEUE_DEAD)
#: How long the page waits for RabbitMQ to tell a queue's depth.
QUEUE_DEPTH_TIMEOUT_S = 2.0


async def _depth(app: web.Application, name: str) -> Queue:
    broker = app[BROKER]
    if broker.ready:
        with contextlib.suppress(Exception):  # down or slow: the page says "unknown"
            ready, consumers = await asyncio.wait_for(broker.queue_depth(name),
                                                      QUEUE_DEPTH_TIMEOUT_S)
            return Queue(name=name, ready=ready, consumers=consumers)
    return Queue(name=name, ready=None, consumers=None)


def worker_of(row: Any) -> Worker:
    finished = row["run_id"] is not None and row["run_status"] is not None
    running_for = row["running_for_s"] if row["run_id"] is not None and not finished \
        else None
    return Worker(
        name=row["name"], hostname=row["hostname"], pid=row["pid"], state=row["state"],
        status=row["status"], version=row["version"], started_at=row["started_at"],
        last_seen_at=row["last_seen_at"], seen_s_ago=round(row["seen_s_ago"], 1),
        run_id=row["run_id"], run_finished=finished,
        running_for_s=round(running_for, 1) if running_for is not None else None,
        source_path=row["source_path"], layer=row["layer"], entry_name=row["entry_name"],
        attempt=row["attempt"], run_status=row["run_status"],
    )


async def workers(app: web.Application, given: WorkersQuery | None, path: str) -> Workers:
    """A page of the workers by name (``given``), or, with ``given`` None, every worker most
    recently seen first (the page's board)."""
    settings = app[SETTINGS]
    pool = app[POOL]
    rules = (timedelta(seconds=settings.worker_inactive_s),
             timedelta(seconds=settings.worker_offline_s))
    if given is None:
        rows = await WORKER_LIST.fetch(pool, *rules)
        more = False
    else:
        rows = await WORKER_PAGE.fetch(pool, *rules, given.after or "", given.limit)
        more = len(rows) == given.limit
    found = [worker_of(row) for row in rows]
    counts = {"active": 0, "inactive": 0, "offline": 0}
    for row in await WORKER_COUNTS.fetch(pool, *rules):
        counts[row["status"]] = row["workers"]
    queues = await asyncio.gather(*(_depth(app, name) for name in QUEUES))
    return Workers(
        counts=counts,
        rules=WorkerRules(inactive_after_s=settings.worker_inactive_s,
                          offline_after_s=settings.worker_offline_s,
                          forgotten_after_s=settings.worker_forget_s),
        workers=found, queues=list(queues),
        next=next_link(path, given, after=found[-1].name) if given and more else None,
    )


async def workers_page(request: web.Request) -> web.Response:
    answer = await workers(request.app, None, "/workers")
    return page(request, "workers.html", title="Workers", answer=answer,
                headers={"Refresh": "30"})

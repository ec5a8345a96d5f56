"""Every Prometheus metric of oa-machine, in one place (``prometheus-client``'s default registry).

Each process exports the metrics it can know: the webhook its HTTP latency, every consumer the
messages it holds unacknowledged, the dequeuer the queue depths and the state of runs and
workers read from PostgreSQL. Gauges read from PostgreSQL or RabbitMQ are the same in every
dequeuer replica: aggregate them with ``max``, not ``sum``. ``oa_broker_unacked_messages`` is
per process: ``sum`` it over processes to get a queue's unacknowledged messages.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# --- RabbitMQ ------------------------------------------------------------------------------
QUEUE_READY = Gauge(
    "oa_queue_ready_messages", "Messages ready in a RabbitMQ queue (passive declare).", ["queue"]
)
UNACKED = Gauge(
    "oa_broker_unacked_messages",
    "Messages this process holds delivered but not yet acknowledged.",
    ["queue"],
)
DEAD_LETTERED = Counter(
    "oa_messages_dead_lettered_total", "Messages this process sent to the dead queue.", ["queue"]
)
RECONNECTS = Counter(
    "oa_reconnects_total", "Connections re-established after a loss.", ["dependency"]
)
DEPENDENCY_ERRORS = Counter(
    "oa_dependency_errors_total",
    "Operations that failed because PostgreSQL, RabbitMQ or storage was unavailable; "
    "they are tried again.",
    ["dependency"],
)

# --- runs ----------------------------------------------------------------------------------
RUNS = Gauge(
    "oa_runs",
    "Open runs by state: unqueued (waiting to be queued), queued (in the tasks queue or being "
    "taken), running (a worker holds its lease), retrying (waiting to be run again later).",
    ["state"],
)
RUNS_IN_FLIGHT = Gauge(
    "oa_runs_in_flight",
    "Runs queued or running: the work the worker pool is sized for (KEDA scales on it).",
)
RUNS_SETTLED = Counter(
    "oa_runs_settled_total", "Runs this process settled, by outcome.", ["status", "problem"]
)
RUNS_REQUEUED = Counter(
    "oa_runs_requeued_total",
    "Runs given to a worker again: lost (lease expired), returned (handed back), "
    "unseen (task lost on the way), retry (transient download failure).",
    ["reason"],
)
RUN_DURATION = Histogram(
    "oa_run_duration_seconds",
    "Wall time of settled runs, from the start of their last attempt to their result.",
    ["status"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 21600),
)

# --- workers -------------------------------------------------------------------------------
WORKERS = Gauge("oa_workers", "Workers by status (active, inactive, offline).", ["status"])

# --- webhook and GitHub ----------------------------------------------------------------------
HTTP_LATENCY = Histogram(
    "oa_http_request_duration_seconds",
    "Time to answer an HTTP request of the webhook service.",
    ["route", "method", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
DELIVERIES = Counter(
    "oa_webhook_deliveries_total", "GitHub deliveries received, by event and answer.",
    ["event", "status"],
)
OUTBOX_BACKLOG = Gauge(
    "oa_status_outbox_backlog", "Commit statuses waiting to be sent to GitHub."
)
OUTBOX_OLDEST_AGE = Gauge(
    "oa_status_outbox_oldest_age_seconds", "Age of the oldest commit status not yet sent."
)

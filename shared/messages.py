"""Wire models exchanged through RabbitMQ, and the names of exchanges, queues and routes.

Every message is a pydantic model with a ``schema_version`` and a ``kind``; consumers validate
with :data:`ANY_MESSAGE` (or a narrower adapter) where the handler starts, and a message that
fails validation is dead-lettered with the reason (see :mod:`shared.broker`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

SCHEMA_VERSION: Final = 1

# Exchanges (all durable, direct) and the queues bound to them.
EXCHANGE_TASKS = "tasks"
EXCHANGE_DONE = "done"
EXCHANGE_DUE = "due"
EXCHANGE_DEAD = "dead"

#: A priority queue (shared/topology.py); its name differs from the earlier versions' plain
#: queue, LEGACY_QUEUE_TASKS, since a queue's arguments cannot change once declared.
QUEUE_TASKS = "tasks.priority"
LEGACY_QUEUE_TASKS = "tasks"
QUEUE_DONE = "done"
QUEUE_DUE = "due"
QUEUE_DEAD = "dead"

# Routing keys. Heartbeats travel on the `done` exchange so that one queue tells the dequeuer
# everything about runs in progress. Messages may be handled concurrently and out of order, so
# every state change is guarded in SQL (a heartbeat never touches a run that is already final).
ROUTE_TASK = "task"
ROUTE_DONE = "done"
ROUTE_DUE = "due"
ROUTE_HEARTBEAT = "heartbeat"
ROUTE_RETURNED = "returned"
ROUTE_DEAD = "dead"

Layer = Literal["addresses", "parcels", "buildings", "centerlines"]
RunStatus = Literal["success", "failure", "skipped"]

#: Where a run failed; set where the failure happens, never guessed from log text.
SourceProblem = Literal[
    "skip_source",
    "missing_conform",
    "invalid_source",
    "unknown_protocol",
    "unknown_format",
    "download_failed",
    "no_esri_token",
    "conform_failed",
    "no_features",
    "test_failed",
    "timeout",
    "out_of_memory",
    "worker_lost",
]


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class Message(BaseModel):
    """Fields every message carries."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    sent_at: datetime = Field(default_factory=utcnow)


class PreviousRun(BaseModel):
    """What a new run needs of an earlier successful run of the same entry to reuse it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: int
    fingerprint: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    #: Output name to storage key, as in that run's `done`.
    outputs: dict[str, str] = Field(default_factory=dict)
    #: That run's ``index.json``.
    state: dict[str, Any] = Field(default_factory=dict)


class Task(Message):
    """Process one run: one layer entry of one source at one commit.

    The source's JSON travels in the message so the worker needs neither GitHub nor the
    database.
    """

    kind: Literal["task"] = "task"
    run_id: int
    job_id: int | None = None
    set_id: int | None = None
    attempt: int = Field(default=1, ge=1)
    source_path: str
    layer: Layer
    entry_name: str
    commit_sha: str | None = None
    source: dict[str, Any]
    #: Wall-clock limit for the run, from the source's `timeout` (hours) or the default.
    timeout_s: float | None = Field(default=None, gt=0)
    #: The latest successful run of the same, unchanged entry: its data is fetched
    #: conditionally and, if unchanged, its outputs are reused.
    previous: PreviousRun | None = None


class Done(Message):
    """A run is over, whatever the outcome. Sent exactly once per attempt by the worker."""

    kind: Literal["done"] = "done"
    run_id: int
    attempt: int = Field(default=1, ge=1)
    worker: str
    status: RunStatus
    source_problem: SourceProblem | None = None
    error: str | None = None
    #: Output name (``out.csv``, ``index.json``, ...) to storage key.
    outputs: dict[str, str] = Field(default_factory=dict)
    #: The run's ``index.json`` content.
    state: dict[str, Any] = Field(default_factory=dict)
    started_at: datetime | None = None
    finished_at: datetime = Field(default_factory=utcnow)
    #: The failure was transient (the data server answered 5xx, timed out or reset the
    #: connection after the in-run retries): the dequeuer may run the whole run again later.
    retryable: bool = False


class Due(Message):
    """A run's deadline has passed: settle it as timed out unless `done` came first."""

    kind: Literal["due"] = "due"
    run_id: int
    attempt: int = Field(default=1, ge=1)
    deadline_at: datetime


class Heartbeat(Message):
    """A worker is alive; ``run_id`` is the run it works on, if any."""

    kind: Literal["heartbeat"] = "heartbeat"
    worker: str
    hostname: str
    pid: int
    run_id: int | None = None
    attempt: int | None = None
    #: When the run must be over (its time limit plus a grace period for upload).
    deadline_at: datetime | None = None
    state: Literal["idle", "running", "stopping"] = "idle"


class Returned(Message):
    """A worker gives a run back unfinished (it was asked to stop and the grace period ran out).

    The dequeuer queues the run again with ``attempt + 1``, or fails it once it has used up its
    attempts. A ``returned`` for an attempt that is no longer current changes nothing.
    """

    kind: Literal["returned"] = "returned"
    run_id: int
    attempt: int = Field(ge=1)
    worker: str
    reason: str


AnyMessage = Annotated[Task | Done | Due | Heartbeat | Returned, Field(discriminator="kind")]
ANY_MESSAGE: TypeAdapter[Task | Done | Due | Heartbeat | Returned] = TypeAdapter(AnyMessage)

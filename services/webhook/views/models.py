"""What the site shows, as pydantic models: the JSON API answers with them, the pages render
them, and ``/api/openapi.json`` is generated from them (``openapi.py``).

URLs in these models are paths on this site (``/runs/12``), valid behind any proxy.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, computed_field

#: How the site names a run's state: the outcome, or where an open run is.
RunState = Literal["queued", "running", "success", "failure", "skipped"]
JobState = Literal["running", "success", "failure", "error"]
WorkerStatus = Literal["active", "inactive", "offline"]

#: ``site_run_rank()`` of migration 0007: the order runs are listed in, failures first.
RANK_OF_STATE: dict[RunState, int] = {
    "failure": 0, "running": 1, "queued": 2, "skipped": 3, "success": 4,
}
STATE_OF_RANK: dict[int, RunState] = {rank: state for state, rank in RANK_OF_STATE.items()}

#: Output files offered for download, in the order they are listed.
DOWNLOADS = ("processed.zip", "out.csv", "out.geojson")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


_M = TypeVar("_M", bound=_Model)


def source_name(source_path: str) -> str | None:
    """``sources/us/ca/alameda.json`` → ``us/ca/alameda``; None for any other path."""
    if source_path.startswith("sources/") and source_path.endswith(".json"):
        name = source_path[len("sources/"):-len(".json")]
        return name or None
    return None


def source_url(source_path: str) -> str | None:
    name = source_name(source_path)
    return f"/sources/{_quoted_path(name)}" if name else None


def file_url(run_id: int, name: str) -> str:
    return f"/runs/{run_id}/{_quoted(name)}"


@lru_cache(maxsize=256)
def _quoted(name: str) -> str:
    # Output names repeat (out.csv, preview.png...): quoted once each.
    return quote(name, safe="")


@lru_cache(maxsize=4096)
def _quoted_path(name: str) -> str:
    # Sources repeat across the runs of a page.
    return quote(name)


def run_state(status: str | None, started_at: datetime | None) -> RunState:
    if status in ("success", "failure", "skipped"):
        return status  # type: ignore[return-value]
    return "running" if started_at is not None else "queued"


_set = object.__setattr__


def _built(cls: type[_M], values: dict[str, Any]) -> _M:
    """``cls.model_construct(**values)`` for ``values`` that name every field of ``cls`` (no
    defaults to fill in, no extra or private attributes): the same instance, without the
    per-field loop that makes ``model_construct`` slower than validating. For values that
    come from our own SQL only."""
    built = cls.__new__(cls)
    _set(built, "__dict__", values)
    _set(built, "__pydantic_fields_set__", set(values))
    _set(built, "__pydantic_extra__", None)
    _set(built, "__pydantic_private__", None)
    return built


class Tally(_Model):
    """Runs by state."""

    total: int = 0
    success: int = 0
    failure: int = 0
    skipped: int = 0
    running: int = 0
    queued: int = 0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def settled(self) -> int:
        """Runs with an outcome."""
        return self.success + self.failure + self.skipped

    @computed_field  # type: ignore[prop-decorator]
    @property
    def success_rate(self) -> float | None:
        """Succeeded among the runs that succeeded or failed (skipped runs left out)."""
        ran = self.success + self.failure
        return self.success / ran if ran else None

    @property
    def open(self) -> int:
        return self.running + self.queued

    @classmethod
    def of(cls, counts: dict[str, int]) -> Tally:
        return cls(total=sum(counts.values()), **counts)

    def summary(self) -> str:
        """``5 runs: 3 succeeded, 2 failed``."""
        parts = [f"{self.success:,} succeeded" if self.success else "",
                 f"{self.failure:,} failed" if self.failure else "",
                 f"{self.skipped:,} skipped" if self.skipped else "",
                 f"{self.running:,} running" if self.running else "",
                 f"{self.queued:,} queued" if self.queued else ""]
        said = ", ".join(part for part in parts if part)
        noun = "run" if self.total == 1 else "runs"
        return f"{self.total:,} {noun}: {said}" if said else f"{self.total:,} {noun}"


class Run(_Model):
    """A run: one layer entry of one source at one commit."""

    id: int
    url: str
    job_id: int | None
    set_id: int | None
    source_path: str = Field(description="The source file, e.g. sources/us/ca/alameda.json")
    source: str | None = Field(description="The source's name, e.g. us/ca/alameda")
    source_url: str | None
    layer: str
    entry_name: str
    state: RunState
    status: Literal["success", "failure", "skipped"] | None
    source_problem: str | None
    error: str | None
    attempt: int
    worker: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None = Field(
        description="From start to finish; while running, from start to now")
    features: int | None = Field(description="Features written (index.json 'feature count')")
    warning: str | None = Field(description=(
        "Set on a success whose counts fell sharply against the entry's last good run "
        "(e.g. 'features 1,000 → 850 (-15%)'): the earlier run stays the entry's good data"))
    outputs: dict[str, str] = Field(description="Output file name to its storage key")
    files: dict[str, str] = Field(description="Output file name to its download URL")

    @classmethod
    def of(cls, row: Any, now: datetime | None = None) -> Run:
        """From a row of ``sql.RUN_COLUMNS``: our own SQL's columns, of the types declared
        here, so not validated again (a page lists 50: validating cost about 0.2 ms of it);
        :func:`_built`."""
        run_id, path, started, finished = (row["id"], row["source_path"], row["started_at"],
                                           row["finished_at"])
        duration = None
        if started is not None:
            end = finished if finished is not None else (now or datetime.now(UTC))
            duration = max((end - started).total_seconds(), 0.0)
        outputs = row["outputs"] or {}
        source = source_name(path)
        status = row["status"]
        return _built(cls, {
            "id": run_id, "url": f"/runs/{run_id}", "job_id": row["job_id"],
            "set_id": row["set_id"], "source_path": path, "source": source,
            "source_url": f"/sources/{_quoted_path(source)}" if source else None,
            "layer": row["layer"], "entry_name": row["entry_name"],
            "state": run_state(status, started), "status": status,
            "source_problem": row["source_problem"], "error": row["error"],
            "attempt": row["attempt"], "worker": row["worker"], "created_at": row["created_at"],
            "started_at": started, "finished_at": finished, "duration_s": duration,
            "features": row["features"], "warning": row["warning"], "outputs": outputs,
            "files": {name: f"/runs/{run_id}/{_quoted(name)}" for name in outputs},
        })

    @property
    def downloads(self) -> list[str]:
        return [name for name in DOWNLOADS if name in self.outputs]


class RunDetail(Run):
    """A run with everything its page shows."""

    commit_sha: str | None
    entry: dict[str, Any] | None = Field(description="The source entry exactly as it was run")
    index: dict[str, Any] = Field(description="The run's index.json")
    queued_at: datetime | None
    retries: int
    earlier: list[Run] = Field(description="Earlier runs of the same entry, newest first")


class Job(_Model):
    """A job: the runs of one GitHub push or pull request."""

    id: int
    url: str
    event: str
    repo: str
    sha: str
    ref: str | None
    pr_number: int | None
    head_repo: str | None
    state: JobState
    status: Literal["success", "failure", "error"] | None
    created_at: datetime
    finished_at: datetime | None
    commit_url: str
    pr_url: str | None
    runs: Tally


class JobDetail(_Model):
    job: Job
    runs: list[Run]


class JobList(_Model):
    items: list[Job]
    next: str | None = Field(description="The next page, or null on the last one")


class RunList(_Model):
    items: list[Run]
    next: str | None


class Set(_Model):
    """A set: the runs of one batch of every source."""

    id: int
    url: str
    kind: str
    created_at: datetime
    finished_at: datetime | None
    status: str | None
    runs: Tally


class SetDetail(_Model):
    set: Set
    problems: dict[str, int] = Field(description="Failed and skipped runs by source problem")
    runs: list[Run] = Field(description="A page of the set's runs, failures first")
    next: str | None


class SetList(_Model):
    items: list[Set]
    next: str | None


class Entry(_Model):
    """A layer entry of a source: its latest published run and its latest good one."""

    source_path: str
    source: str | None
    layer: str
    entry_name: str
    latest_run_id: int
    latest_status: str
    latest_finished_at: datetime
    good_run_id: int | None
    good_finished_at: datetime | None
    features: int | None
    addresses: int | None
    downloads: dict[str, str] = Field(
        description="Stable links to the latest good outputs (/latest/run/...)")


class Source(_Model):
    source_path: str
    source: str | None
    url: str | None
    entries: list[Entry]


class SourceList(_Model):
    items: list[Source]
    next: str | None


class SourceDetail(_Model):
    source: Source
    runs: list[Run] = Field(description="Every run of the source, newest first (a page)")
    next: str | None


class Worker(_Model):
    name: str = Field(description="Unique; the API lists workers by name")
    hostname: str
    pid: int
    state: str
    status: WorkerStatus
    version: str | None
    started_at: datetime
    last_seen_at: datetime
    seen_s_ago: float
    run_id: int | None
    run_finished: bool = Field(description="The run last reported has ended since")
    running_for_s: float | None
    source_path: str | None
    layer: str | None
    entry_name: str | None
    attempt: int | None
    run_status: str | None


class Queue(_Model):
    name: str
    ready: int | None = Field(description="Messages waiting; null when RabbitMQ did not say")
    consumers: int | None


class WorkerRules(_Model):
    inactive_after_s: float
    offline_after_s: float
    forgotten_after_s: float


class Workers(_Model):
    counts: dict[WorkerStatus, int]
    rules: WorkerRules
    workers: list[Worker]
    queues: list[Queue]
    next: str | None = Field(description="The next page of workers, or null on the last one "
                                         "(the counts and queues are of all, on every page)")


class Problem(_Model):
    """An error answer."""

    error: str


class Home(_Model):
    """The figures of the home page."""

    sources: int
    entries: int
    addresses: int
    runs_today: int
    latest_set: Set | None
    recent_jobs: list[Job]


class ScheduleSlot(_Model):
    """One slot the scheduler claimed: when it was due, when it ran, what came of it."""

    slot_id: str = Field(description="The entry and the slot's time in UTC, e.g. "
                                     "batch:2026-12-04T12:00:00+00:00")
    slot_at: datetime
    started_at: datetime
    finished_at: datetime | None = Field(description="Null while it runs (or if cut off)")
    outcome: Literal["done", "failed", "skipped"] | None
    detail: str | None


class ScheduleEntry(_Model):
    """One thing the scheduler does (batch sets, collections, clean-up), and when."""

    entry: str
    cron: str = Field(description="A cron expression in UTC, or off")
    last: ScheduleSlot | None = Field(description="The last slot recorded; null if none yet")
    next: datetime | None = Field(description="The next slot; null when the entry is off")


class Schedule(_Model):
    """The scheduler's entries, as of ``now``."""

    now: datetime
    entries: list[ScheduleEntry]


# --- Query strings ----------------------------------------------------------------------------
# Pages and the API read the same parameters; ``params.parse`` validates them (400 otherwise).
# A number PostgreSQL cannot take for its column (an id past bigint, a pull request number past
# integer) is refused here, named, rather than failing in the query as a 500: the bounds are
# the columns' types, declared once below (``params.integer_id`` checks the ids in paths
# against the same ones; ``params`` also refuses text that PostgreSQL cannot hold).

#: PostgreSQL's bigint (every id, so every id cursor) and integer (``jobs.pr_number``).
BIGINT_MAX = 2**63 - 1
INT4_MAX = 2**31 - 1
#: The most items a list gives in one answer.
PAGE_MAX = 200

#: A row's id, or a cursor made of one.
Id = Annotated[int, Field(ge=1, le=BIGINT_MAX)]
PullNumber = Annotated[int, Field(ge=1, le=INT4_MAX)]
Limit = Annotated[int, Field(ge=1, le=PAGE_MAX, description="Items per page")]


class _Query(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    limit: Limit = 50


class JobsQuery(_Query):
    before: Id | None = Field(default=None, description="Jobs older than this id")
    state: JobState | None = None
    repo: str | None = Field(default=None, max_length=200, description="owner/name")
    pr: PullNumber | None = Field(default=None, description="Pull request number (needs repo)")


class RunsQuery(_Query):
    before: Id | None = Field(default=None, description="Runs older than this id")
    status: Literal["success", "failure", "skipped", "open"] | None = Field(
        default=None, description="An outcome, or open (queued or running)")
    job: Id | None = None
    set: Id | None = None
    source: str | None = Field(default=None, max_length=500,
                               description="A source's name, e.g. us/ca/alameda")


class SetsQuery(_Query):
    limit: Limit = 25
    before: Id | None = Field(default=None, description="Sets older than this id")


class SetRunsQuery(_Query):
    # The id part may be past bigint (19 digits): sets.set_detail clamps it to the largest id.
    after: str | None = Field(default=None, pattern=r"^[0-4]\.[0-9]{1,19}$",
                              description="Cursor: the `next` link's")
    state: RunState | None = None
    problem: str | None = Field(default=None, max_length=100, description="A source problem")


class SourcesQuery(_Query):
    after: str | None = Field(default=None, max_length=500,
                              description="Sources after this name")


class SourceRunsQuery(_Query):
    before: Id | None = Field(default=None, description="Runs older than this id")


class WorkersQuery(_Query):
    after: str | None = Field(default=None, max_length=500,
                              description="Workers after this name (the `next` link's)")

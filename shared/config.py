"""Settings for every service, read from the environment (pydantic-settings).

One class holds every variable so that `.env.example`, the docs and the validation stay in one
place. A service calls :func:`load_settings`, which turns a validation error into one clear
line naming the variable (see :class:`shared.errors.ConfigError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.errors import ConfigError

#: The checkout (or installed tree) root: local state lives under it by default so that a
#: fresh clone needs nothing else.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STORAGE_URL = (PROJECT_ROOT / "var" / "storage").as_uri()
#: Requests one worker has in flight to one ArcGIS host (ESRI_HOST_LIMIT): a few pages at
#: once make a dump several times faster, and a public server hardly notices four.
DEFAULT_ESRI_HOST_LIMIT = 4


class Settings(BaseSettings):
    """Every setting of every service. Names map to upper-case environment variables."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    database_url: str = "postgresql://postgres@127.0.0.1:5432/oamachine"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    #: RabbitMQ's management UI (`rabbitmq-plugins enable rabbitmq_management`): `oa-machine
    #: up` prints this address once it answers there, and says nothing when it does not.
    rabbitmq_management_url: str = "http://127.0.0.1:15672/"
    storage_url: str = DEFAULT_STORAGE_URL
    s3_endpoint_url: str | None = None

    github_api_url: str = "https://api.github.com"
    github_token: SecretStr | None = None
    webhook_secrets: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    public_base_url: str = "http://127.0.0.1:8080"
    #: Context of the commit statuses posted (the reference Machine's, which branch protection
    #: rules of the sources repository may require).
    status_context: str = Field(default="openaddresses/hooked", min_length=1, max_length=255)

    log_format: Literal["json", "console"] | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)

    #: Lets the worker download from private and loopback addresses (tests and the demo only).
    allow_private_urls: bool = False
    #: Where the worker keeps downloads and outputs while a run is in progress.
    work_dir: Path = PROJECT_ROOT / "var" / "work"
    #: Default wall-clock limit of one run when the source sets no `timeout` (hours in sources).
    run_timeout_s: float = Field(default=6 * 3600, gt=0)
    #: Address-space limit of the child process that runs one source.
    run_memory_bytes: int = Field(default=4 * 1024**3, gt=0)
    #: Largest total size an archive may expand to.
    max_unpacked_bytes: int = Field(default=20 * 1024**3, gt=0)
    #: Largest download a run may take: bytes on the wire (http, ftp, each ESRI page and the
    #: whole ESRI dump); a gzip or deflate Content-Encoding inflates within MAX_UNPACKED_BYTES.
    max_download_bytes: int = Field(default=10 * 1024**3, gt=0)
    #: Requests one worker has in flight to one ArcGIS host, the pages of all its runs together
    #: (see services/worker/sources/hosts.py); 1 fetches one page after another.
    esri_host_limit: int = Field(default=DEFAULT_ESRI_HOST_LIMIT, ge=1, le=32)
    #: User-Agent of every download; unset sends ``oa-machine/VERSION (+sources URL)``.
    user_agent: str | None = Field(default=None, min_length=1, max_length=512)
    #: Runs one worker process works on at once.
    worker_concurrency: int = Field(default=1, ge=1, le=64)
    #: Name a worker reports in heartbeats; defaults to host name and pid.
    worker_name: str | None = None
    #: Seconds between two heartbeats of a worker (also while a run is in progress).
    worker_heartbeat_s: float = Field(default=15.0, gt=0)
    #: While a run is in progress its log (``output.txt``) is stored this often, when it grew,
    #: so that its page shows how far it got; the run's end stores the whole log anyway.
    worker_live_log_s: float = Field(default=30.0, gt=0)
    #: On SIGTERM a worker stops taking tasks and lets its runs finish for this long; runs still
    #: going are then stopped and handed back (queued again with their attempt + 1).
    worker_grace_s: float = Field(default=90.0, ge=0)
    #: A run whose worker sends no heartbeat for this long is presumed lost and queued again.
    run_lease_s: float = Field(default=120.0, gt=0)
    #: Attempts a run gets that end without a result (worker lost or run handed back).
    run_max_attempts: int = Field(default=3, ge=1)
    #: A run whose download failed transiently (5xx, timeout, reset) after the in-run retries is
    #: run again after this delay, at most RUN_RETRY_MAX times, before it fails.
    run_retry_delay_s: float = Field(default=3600.0, ge=0)
    run_retry_max: int = Field(default=3, ge=0)
    #: A worker is inactive after this long without a heartbeat, offline after the second; offline
    #: workers are forgotten after the third.
    worker_inactive_s: float = Field(default=600.0, gt=0)
    worker_offline_s: float = Field(default=1200.0, gt=0)
    worker_forget_s: float = Field(default=7 * 24 * 3600.0, gt=0)

    #: The sources repository the batch sets read (``owner/name``).
    sources_repository: str = Field(default="openaddresses/openaddresses",
                                    pattern=r"^[\w.-]+/[\w.-]+$")
    #: When the scheduler acts, as cron expressions in UTC, or ``off``: the batch set of every
    #: source, the regional collections (a later issue; the slot exists), the clean-up.
    schedule_batch: str = "0 12 * * 5"
    schedule_collections: str = "0 3 */2 * *"
    schedule_clean_up: str = "0 5 * * 0"
    #: How often the leading scheduler looks for a due slot, in seconds.
    schedule_poll_s: float = Field(default=30.0, gt=0)
    #: A batch set reuses the outputs of an unchanged entry's good run at most this many days old.
    batch_reuse_days: float = Field(default=10.0, ge=0)
    #: The scheduler keeps the tasks queue under this many batch tasks; 0 means twice the number
    #: of active workers, at least 10.
    batch_queue_depth: int = Field(default=0, ge=0)
    #: A run whose feature count (or count of numbers or streets) falls by this share or more
    #: against the entry's last good run is marked with a warning.
    regression_threshold: float = Field(default=0.10, gt=0, lt=1)
    #: Clean-up: runs kept per entry besides its latest good one and one a month.
    retention_runs: int = Field(default=5, ge=1)
    #: Clean-up: deliveries and sent statuses older than this many days are removed.
    retention_days: int = Field(default=30, ge=1)

    #: Port of the small HTTP server of the worker, dequeuer and scheduler (/metrics,
    #: /health/live, /health/ready); 0 picks a free port. The webhook serves them on HTTP_PORT.
    metrics_port: int = Field(default=9100, ge=0, le=65535)

    @field_validator("webhook_secrets", mode="before")
    @classmethod
    def _split_secrets(cls, value: object) -> object:
        # Comma-separated so that a new secret can be added before the old one is removed.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must start with postgresql://")
        return value

    @field_validator("amqp_url")
    @classmethod
    def _check_amqp_url(cls, value: str) -> str:
        if not value.startswith(("amqp://", "amqps://")):
            raise ValueError("must start with amqp:// or amqps://")
        return value

    @field_validator("storage_url")
    @classmethod
    def _check_storage_url(cls, value: str) -> str:
        if not value.startswith(("file://", "s3://")):
            raise ValueError("must be file:///some/dir or s3://bucket/prefix")
        return value

    @field_validator("schedule_batch", "schedule_collections", "schedule_clean_up")
    @classmethod
    def _check_cron(cls, value: str) -> str:
        from croniter import croniter  # only settings that hold a schedule need it

        value = value.strip()
        if value.lower() == "off":
            return "off"
        if not croniter.is_valid(value):
            raise ValueError("must be a cron expression (minute hour day month weekday, and "
                             "optionally seconds) or off")
        return value

    @model_validator(mode="after")
    def _check_timing(self) -> Settings:
        # A lease shorter than two heartbeats would expire between two beats of a healthy worker.
        if self.run_lease_s < 2 * self.worker_heartbeat_s:
            raise ValueError(
                "RUN_LEASE_S must be at least twice WORKER_HEARTBEAT_S "
                f"({self.run_lease_s:g} < 2 × {self.worker_heartbeat_s:g})"
            )
        if self.worker_offline_s < self.worker_inactive_s:
            raise ValueError("WORKER_OFFLINE_S must not be shorter than WORKER_INACTIVE_S")
        return self

    @property
    def demo_mode(self) -> bool:
        """No GitHub token: `oa-machine up` plays GitHub and a data provider itself."""
        return self.github_token is None


def load_settings(**overrides: object) -> Settings:
    """Read the settings from the environment, raising :class:`ConfigError` on the first bad one."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        if not first["loc"]:
            # A rule across settings (model validator): its message names the variables.
            raise ConfigError(f"invalid settings: {first['msg']}") from exc
        variable = "_".join(str(part) for part in first["loc"][:1]).upper()
        raise ConfigError(f"invalid setting {variable}: {first['msg']}") from exc

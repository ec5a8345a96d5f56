"""Settings for every service, read from the environment (pydantic-settings).

One class holds every variable so that `.env.example`, the docs and the validation stay in one
place. A service calls :func:`load_settings`, which turns a validation error into one clear
line naming the variable (see :class:`shared.errors.ConfigError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.errors import ConfigError

#: The checkout (or installed tree) root: local state lives under it by default so that a
#: fresh clone needs nothing else.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STORAGE_URL = (PROJECT_ROOT / "var" / "storage").as_uri()


class Settings(BaseSettings):
    """Every setting of every service. Names map to upper-case environment variables."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    database_url: str = "postgresql://postgres@127.0.0.1:5432/oamachine"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    storage_url: str = DEFAULT_STORAGE_URL
    s3_endpoint_url: str | None = None

    github_api_url: str = "https://api.github.com"
    github_token: SecretStr | None = None
    webhook_secrets: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    public_base_url: str = "http://127.0.0.1:8080"

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
    #: Runs one worker process works on at once.
    worker_concurrency: int = Field(default=1, ge=1, le=64)
    #: Name a worker reports in heartbeats; defaults to host name and pid.
    worker_name: str | None = None

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
        variable = "_".join(str(part) for part in first["loc"][:1]).upper() or "?"
        raise ConfigError(f"invalid setting {variable}: {first['msg']}") from exc

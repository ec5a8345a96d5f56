"""Settings: defaults, parsing from the environment, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import PROJECT_ROOT, Settings, load_settings
from shared.errors import ConfigError

VARIABLES = (
    "DATABASE_URL",
    "AMQP_URL",
    "STORAGE_URL",
    "S3_ENDPOINT_URL",
    "GITHUB_TOKEN",
    "WEBHOOK_SECRETS",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "HTTP_PORT",
    "WORKER_CONCURRENCY",
    "ALLOW_PRIVATE_URLS",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test from an environment without our variables."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_defaults() -> None:
    settings = load_settings()
    assert settings.database_url.startswith("postgresql://")
    assert settings.amqp_url.startswith("amqp://")
    assert settings.storage_url == (PROJECT_ROOT / "var" / "storage").as_uri()
    assert settings.webhook_secrets == []
    assert settings.github_token is None
    assert settings.demo_mode
    assert settings.allow_private_urls is False
    assert settings.worker_concurrency == 1
    assert settings.work_dir == PROJECT_ROOT / "var" / "work"


def test_values_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@db:5432/oa")
    monkeypatch.setenv("STORAGE_URL", "s3://bucket/prefix")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_secret")
    monkeypatch.setenv("HTTP_PORT", "9000")
    monkeypatch.setenv("ALLOW_PRIVATE_URLS", "true")
    settings = load_settings()
    assert settings.database_url == "postgresql://u@db:5432/oa"
    assert settings.storage_url == "s3://bucket/prefix"
    assert settings.github_token is not None
    assert settings.github_token.get_secret_value() == "ghp_secret"
    assert "ghp_secret" not in repr(settings)
    assert not settings.demo_mode
    assert settings.http_port == 9000
    assert settings.allow_private_urls is True


def test_webhook_secrets_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOK_SECRETS", " new-secret , old-secret,, ")
    settings = load_settings()
    assert [secret.get_secret_value() for secret in settings.webhook_secrets] == [
        "new-secret",
        "old-secret",
    ]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DATABASE_URL", "mysql://localhost/oa"),
        ("AMQP_URL", "http://localhost"),
        ("STORAGE_URL", "/var/storage"),
        ("HTTP_PORT", "70000"),
        ("LOG_LEVEL", "verbose"),
        ("WORKER_CONCURRENCY", "0"),
    ],
)
def test_a_bad_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=f"invalid setting {variable}"):
        load_settings()


def test_overrides_win_over_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("WORKER_CONCURRENCY", "4")
    settings = load_settings(worker_concurrency=2, work_dir=tmp_path)
    assert settings.worker_concurrency == 2
    assert settings.work_dir == tmp_path


def test_settings_fixture_points_at_the_test_services(settings: Settings) -> None:
    assert "/oa_test_" in settings.database_url
    assert "/oa-test-" in settings.amqp_url
    assert settings.storage_url.startswith("file://")
    assert settings.allow_private_urls
    assert settings.work_dir.name == "work"

"""The `oa-machine` console script, run as a real subprocess."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import uuid
from importlib.metadata import version
from pathlib import Path

import asyncpg
import pytest

from shared.db import load_migrations
from tests.conftest import POSTGRES_SERVER_URL

ROOT = Path(__file__).resolve().parent.parent
OA_MACHINE = Path(sys.executable).parent / "oa-machine"


def clean_env(**variables: str) -> dict[str, str]:
    """The process environment without any oa-machine setting, plus ``variables``."""
    from shared.config import Settings

    names = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in names}
    env.update(variables)
    return env


def oa_machine(*args: str, **variables: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(OA_MACHINE), *args], env=clean_env(**variables), capture_output=True, text=True,
        timeout=60, check=False, cwd=ROOT,
    )


def test_console_script_is_installed() -> None:
    assert OA_MACHINE.exists()
    result = oa_machine("--help")
    assert result.returncode == 0
    for command in ("webhook", "worker", "dequeuer", "scheduler", "up", "migrate", "process-one"):
        assert command in result.stdout


def test_unknown_command_is_a_usage_error() -> None:
    result = oa_machine("frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


@pytest.mark.parametrize(
    ("command", "variable", "value"),
    [
        ("migrate", "DATABASE_URL", "mysql://x"),
        ("webhook", "AMQP_URL", "http://rabbit"),
        ("worker", "STORAGE_URL", "ftp://bucket"),
        ("dequeuer", "HTTP_PORT", "eighty"),
        ("scheduler", "LOG_LEVEL", "loud"),
        ("process-one", "RUN_TIMEOUT_S", "-1"),
    ],
)
def test_bad_setting_exits_2_with_one_line_naming_it(
    command: str, variable: str, value: str, tmp_path: Path
) -> None:
    extra = [str(tmp_path / "a.json"), str(tmp_path / "out")] if command == "process-one" else []
    result = oa_machine(command, *extra, **{variable: value})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"oa-machine {command}: invalid setting {variable}:")
    assert result.stdout == ""


def test_webhook_without_secrets_exits_2_naming_webhook_secrets() -> None:
    for secrets in (None, " , "):
        variables = {} if secrets is None else {"WEBHOOK_SECRETS": secrets}
        result = oa_machine("webhook", **variables)
        assert result.returncode == 2
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert "WEBHOOK_SECRETS" in lines[0]


async def test_migrate_creates_the_database_and_twice_succeeds() -> None:
    name = f"oa_test_cli_{uuid.uuid4().hex[:12]}"
    url = f"{POSTGRES_SERVER_URL.rstrip('/')}/{name}"
    admin = await asyncpg.connect(f"{POSTGRES_SERVER_URL.rstrip('/')}/postgres")
    try:
        first = oa_machine("migrate", DATABASE_URL=url)
        assert first.returncode == 0, first.stderr
        versions = [migration.version for migration in load_migrations()]
        assert versions[:3] == ["0001", "0002", "0003"]
        assert f"applied {len(versions)} migration(s): {', '.join(versions)}" in first.stdout

        second = oa_machine("migrate", DATABASE_URL=url)
        assert second.returncode == 0, second.stderr
        assert "applied 0 migration(s): none pending" in second.stdout

        conn = await asyncpg.connect(url)
        try:
            tables = {r["tablename"] for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        finally:
            await conn.close()
        assert {"jobs", "runs", "workers", "statuses", "sets"} <= tables
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def test_migrate_on_the_test_database_is_a_no_op(database_url: str) -> None:
    result = oa_machine("migrate", DATABASE_URL=database_url)
    assert result.returncode == 0, result.stderr
    assert "none pending" in result.stdout


def test_process_one_with_a_missing_file_exits_1(tmp_path: Path) -> None:
    result = oa_machine("process-one", str(tmp_path / "nope.json"), str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.startswith("oa-machine process-one:")
    assert "nope.json" in result.stderr


# --- help and version ---------------------------------------------------------------------------

SUBCOMMANDS = ("webhook", "worker", "dequeuer", "scheduler", "up", "migrate", "dead-letters",
               "enqueue-sources", "clean-up", "collect", "process-one", "check-sources")


def test_subcommands_are_the_parsers() -> None:
    from services.cli import build_parser

    (commands,) = [action for action in build_parser()._actions
                   if isinstance(action, argparse._SubParsersAction)]
    assert tuple(commands.choices) == SUBCOMMANDS


def test_every_argument_of_every_command_has_help() -> None:
    from services.cli import build_parser

    parser = build_parser()
    (commands,) = [action for action in parser._actions
                   if isinstance(action, argparse._SubParsersAction)]
    for name, command in [("oa-machine", parser), *commands.choices.items()]:
        for action in command._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_says_what_a_command_does_and_what_it_reads(command: str) -> None:
    from shared.config import Settings

    result = oa_machine(command, "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    description = text.split(" options: ")[0].split(" positional arguments: ")[0]
    # usage: ... then one sentence, ending where the arguments begin.
    sentence = description.rsplit("] ", 1)[-1] if "[" in description else description
    assert sentence.count(". ") == 0 and sentence.rstrip().endswith("."), sentence
    environment = text.split(" environment: ", 1)[1]
    if command == "check-sources":
        assert environment.startswith("none")
        return
    assert environment.endswith("every setting, with its default and what it does: .env.example")
    named = environment.split(";")[0].split(", ")
    assert named and set(named) <= {name.upper() for name in Settings.model_fields}, named


def test_top_level_help_points_to_the_settings() -> None:
    result = oa_machine("--help")
    assert result.returncode == 0
    assert ".env.example" in result.stdout
    assert "--version" in result.stdout


def test_version_is_the_installed_package_version() -> None:
    result = oa_machine("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"oa-machine {version('oa-machine')}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", version("oa-machine"))

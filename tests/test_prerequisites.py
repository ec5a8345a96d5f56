"""The suite's check of the machine (tests/support/prerequisites.py), before any test runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

from tests.conftest import MISSING_PREREQUISITE
from tests.support.prerequisites import BROWSER_MODULE, Needs, missing, needs_of

ROOT = Path(__file__).resolve().parent.parent
EVERYTHING = Needs(postgres=True, rabbitmq=True, chromium=True)


def check(needs: Needs, *, present: set[str], listening: set[int]) -> list[str]:
    return missing(
        needs, postgres_url="postgresql://postgres@127.0.0.1:5432",
        amqp_url="amqp://guest:guest@127.0.0.1:5672",
        which=lambda name: f"/usr/bin/{name}" if name in present else None,
        reachable=lambda _host, port: port in listening,
    )


def test_nothing_is_missing_when_everything_is_there() -> None:
    assert check(EVERYTHING, present={"chromium", "rabbitmqctl"}, listening={5432, 5672}) == []


def test_each_missing_piece_is_one_line_saying_what_to_install() -> None:
    lines = check(EVERYTHING, present=set(), listening=set())
    assert lines == [
        "missing: PostgreSQL on 127.0.0.1:5432 — install with: apt-get install postgresql, "
        "and start it (or set OA_TEST_POSTGRES_URL)",
        "missing: RabbitMQ on 127.0.0.1:5672 — install with: apt-get install rabbitmq-server, "
        "and start it (or set OA_TEST_AMQP_URL)",
        "missing: rabbitmqctl on PATH (it makes each session's vhost) — install with: "
        "apt-get install rabbitmq-server, and put /usr/sbin on PATH",
        "missing: chromium (the page tests drive it) — install with: apt-get install chromium",
    ]


def test_only_what_the_collected_tests_use_is_asked_for() -> None:
    assert check(Needs(), present=set(), listening=set()) == []
    assert check(Needs(chromium=True), present={"chromium-browser"}, listening=set()) == []


def test_needs_come_from_fixtures_and_from_importing_the_browser() -> None:
    plain = types.ModuleType("plain")
    page = types.ModuleType("page")

    def dump_dom() -> None: ...

    # As if imported from the browser module (this test must not need Chromium itself).
    dump_dom.__module__ = BROWSER_MODULE
    page.dump_dom = dump_dom  # type: ignore[attr-defined]
    assert needs_of([(["tmp_path"], plain)]) == Needs()
    assert needs_of([(["settings", "database_url", "amqp_url"], plain)]) == Needs(
        postgres=True, rabbitmq=True)
    assert needs_of([(["tmp_path"], plain), ([], page)]) == Needs(chromium=True)


def test_pytest_stops_before_the_first_test_naming_what_to_install(tmp_path: Path) -> None:
    # A PATH without Chromium (rabbitmqctl kept, so that only Chromium is missing).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("rabbitmqctl", "git"):
        if (found := shutil.which(tool)) is not None:
            (bin_dir / tool).symlink_to(found)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/webhook/test_job_page_browser.py"],
        cwd=ROOT, env={**os.environ, "PATH": str(bin_dir)}, capture_output=True, text=True,
        timeout=120, check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == MISSING_PREREQUISITE, output
    assert "missing: chromium (the page tests drive it) — install with: apt-get install " \
        "chromium" in output
    assert "no tests ran" in output

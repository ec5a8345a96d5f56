"""What the test suite needs from the machine, checked once the tests are collected and
before the first one runs: a missing piece is one line saying what to install, not a failure
deep inside a test.

Only what the collected tests use is asked for: `pytest tests/test_repository.py` needs
neither a database nor a browser.
"""

from __future__ import annotations

import shutil
import socket
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from urllib.parse import urlsplit

#: Fixtures that need a running PostgreSQL or RabbitMQ (their closures include them).
POSTGRES_FIXTURES = frozenset({"database_url"})
RABBITMQ_FIXTURES = frozenset({"amqp_url"})
#: A test module that imports from this module drives Chromium.
BROWSER_MODULE = "tests.support.browser"


@dataclass(frozen=True)
class Needs:
    postgres: bool = False
    rabbitmq: bool = False
    chromium: bool = False


def needs_of(items: Iterable[tuple[Iterable[str], ModuleType | None]]) -> Needs:
    """What (fixture names, module) pairs of collected tests need from the machine."""
    postgres = rabbitmq = chromium = False
    for fixtures, module in items:
        names = set(fixtures)
        postgres = postgres or bool(names & POSTGRES_FIXTURES)
        rabbitmq = rabbitmq or bool(names & RABBITMQ_FIXTURES)
        chromium = chromium or (module is not None and _uses_browser(module))
    return Needs(postgres, rabbitmq, chromium)


def _uses_browser(module: ModuleType) -> bool:
    # By import rather than by a marker, so a new page test cannot forget to declare it.
    browser = sys.modules.get(BROWSER_MODULE)
    return any(
        (browser is not None and value is browser)
        or getattr(value, "__module__", None) == BROWSER_MODULE
        for value in vars(module).values()
    )


def missing(
    needs: Needs,
    *,
    postgres_url: str,
    amqp_url: str,
    which: Callable[[str], str | None] = shutil.which,
    reachable: Callable[[str, int], bool] | None = None,
) -> list[str]:
    """One line per missing prerequisite, saying what to install (empty: all there)."""
    reachable = reachable or port_open
    lines = []
    if needs.postgres:
        host, port = _address(postgres_url, 5432)
        if not reachable(host, port):
            lines.append(
                f"missing: PostgreSQL on {host}:{port} — install with: apt-get install "
                "postgresql, and start it (or set OA_TEST_POSTGRES_URL)"
            )
    if needs.rabbitmq:
        host, port = _address(amqp_url, 5672)
        if not reachable(host, port):
            lines.append(
                f"missing: RabbitMQ on {host}:{port} — install with: apt-get install "
                "rabbitmq-server, and start it (or set OA_TEST_AMQP_URL)"
            )
        if which("rabbitmqctl") is None:
            lines.append(
                "missing: rabbitmqctl on PATH (it makes each session's vhost) — install with: "
                "apt-get install rabbitmq-server, and put /usr/sbin on PATH"
            )
    if needs.chromium and which("chromium") is None and which("chromium-browser") is None:
        lines.append("missing: chromium (the page tests drive it) — install with: "
                     "apt-get install chromium")
    return lines


def _address(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def port_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections at ``host:port`` (within 3 s)."""
    try:
        with socket.create_connection((host, port), 3):
            return True
    except OSError:
        return False

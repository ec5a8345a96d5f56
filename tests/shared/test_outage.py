"""What counts as an outage (wait and try again) and what does not (count it), as a table."""

from __future__ import annotations

import aiormq.exceptions
import asyncpg
import pytest

from shared.broker import PublishError
from shared.errors import GitHubError, MessageError, NotFound, StorageError, StorageUnavailable
from shared.outage import Backoff, is_outage


def _chained(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


CASES: list[tuple[str, BaseException, bool]] = [
    ("refused", ConnectionRefusedError("connect"), True),
    ("reset", ConnectionResetError("peer"), True),
    ("timeout", TimeoutError(), True),
    ("postgres starting up", asyncpg.exceptions.CannotConnectNowError("starting up"), True),
    ("postgres shutting down", asyncpg.exceptions.AdminShutdownError("terminating"), True),
    ("too many connections", asyncpg.exceptions.TooManyConnectionsError("too many"), True),
    ("deadlock", asyncpg.exceptions.DeadlockDetectedError("deadlock"), True),
    ("serialisation", asyncpg.exceptions.SerializationError("retry"), True),
    ("connection closed", asyncpg.exceptions.InterfaceError("connection is closed"), True),
    ("connection gone", asyncpg.exceptions.ConnectionDoesNotExistError("gone"), True),
    ("channel closed (a RuntimeError)", aiormq.exceptions.ChannelInvalidStateError("closed"), True),
    ("broker connection lost", aiormq.exceptions.ConnectionClosed(320, "forced"), True),
    ("not published", PublishError("broker unavailable"), True),
    ("storage 503", StorageUnavailable("s3: SlowDown"), True),
    ("a library error wrapping a reset", _chained(RuntimeError("x"), ConnectionResetError()), True),
    ("unique violation", asyncpg.exceptions.UniqueViolationError("duplicate"), False),
    ("bad value", asyncpg.exceptions.DataError("invalid input"), False),
    ("NUL in text", asyncpg.exceptions.CharacterNotInRepertoireError("0x00"), False),
    ("storage refused", StorageError("s3: AccessDenied"), False),
    ("our storage error from an OSError (disk full)",
     _chained(StorageError("local storage: no space"), OSError(28, "No space")), False),
    ("no such key", NotFound("no such key"), False),
    ("malformed message", MessageError("invalid"), False),
    ("GitHub", GitHubError("HTTP 422", 422), False),
    ("a bug", ValueError("bug"), False),
    ("another bug", KeyError("run_id"), False),
]


@pytest.mark.parametrize(("name", "exc", "expected"), CASES, ids=[case[0] for case in CASES])
def test_is_outage(name: str, exc: BaseException, expected: bool) -> None:
    assert is_outage(exc) is expected


def test_backoff_doubles_to_its_ceiling_with_jitter_and_resets() -> None:
    backoff = Backoff(first_s=0.5, max_s=4.0)
    delays = [backoff.next_delay_s() for _ in range(6)]
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert all(0.8 * ceiling <= delay <= ceiling for delay, ceiling in zip(delays, ceilings,
                                                                           strict=True))
    backoff.reset()
    assert backoff.next_delay_s() <= 0.5

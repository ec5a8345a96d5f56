"""Telling "a dependency is down" from "this work is broken".

Connection loss is normal, not exceptional: when PostgreSQL restarts, RabbitMQ fails over or
storage answers 503, the same work succeeds later, so a consumer must wait and try again for as
long as it takes, never count the failure against the message. Anything else (a bug, a
constraint violation, a malformed value) is about the work itself and is counted.

:func:`is_outage` is the one place that decides; the broker's ack policy and the services'
loops ask it.
"""

from __future__ import annotations

import asyncio
import random

import aiormq.exceptions
import asyncpg

from shared.errors import BrokerError, OAMachineError, StorageUnavailable

#: SQLSTATE classes and codes that mean "the server is unavailable or busy", not "bad query":
#: 08 connection exceptions, 53 insufficient resources (too many connections, disk full),
#: 57P01-57P05 shutdown / starting up / idle timeouts, 40001 and 40P01 serialisation
#: failures and deadlocks (retrying the transaction is the documented remedy), 58 system errors.
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "53", "57P", "58")
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01"})

#: asyncpg's client-side errors that are bugs in our code, not a lost connection.
_CLIENT_BUGS = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.ClientConfigurationError,
    asyncpg.exceptions.UnsupportedClientFeatureError,
    asyncpg.exceptions.UnsupportedServerFeatureError,
)


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` means PostgreSQL, RabbitMQ or storage is unreachable or restarting.

    Our own errors (:class:`shared.errors.OAMachineError`) say it by their type, decided where
    a library's error was translated; a library's error is looked at through its ``raise ...
    from`` chain.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OAMachineError):
            return isinstance(current, BrokerError | StorageUnavailable)
        if _is_outage_itself(current):
            return True
        current = current.__cause__
    return False


def _is_outage_itself(exc: BaseException) -> bool:
    if isinstance(exc, OSError | TimeoutError | asyncio.TimeoutError):
        # ConnectionRefusedError, resets, DNS failures, aiormq's AMQPConnectionError.
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        return state in _TRANSIENT_SQLSTATES or state.startswith(_TRANSIENT_SQLSTATE_PREFIXES)
    if isinstance(exc, asyncpg.InterfaceError):
        # "connection is closed", "pool is closing", "cannot perform operation: another
        # operation is in progress" after a reset.
        return not isinstance(exc, _CLIENT_BUGS)
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        return True
    if isinstance(exc, aiormq.exceptions.AMQPError | aiormq.exceptions.ChannelInvalidStateError):
        # A closed channel or connection; aiormq raises the latter as a RuntimeError.
        return True
    return False


class Backoff:
    """Delays for trying again: doubling from ``first_s`` up to ``max_s``, with jitter so that
    many processes that lost the same server do not come back at the same instant."""

    def __init__(self, first_s: float = 0.5, max_s: float = 30.0) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.failures = 0

    def next_delay_s(self) -> float:
        """The delay before the next try; each call counts one more failure."""
        delay = min(self.first_s * 2**self.failures, self.max_s)
        self.failures += 1
        return float(delay * random.uniform(0.8, 1.0))

    def reset(self) -> None:
        """Forget the failures (after a success)."""
        self.failures = 0

    async def wait(self) -> None:
        """Sleep for the next delay."""
        await asyncio.sleep(self.next_delay_s())

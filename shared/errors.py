"""The exception tree of oa-machine.

    OAMachineError
    ├── ConfigError          a setting is missing or invalid; the service stops at start
    ├── StorageError         object storage failed (wraps botocore / OS errors)
    │   ├── NotFound         the key does not exist
    │   └── StorageUnavailable  the store is unreachable, overloaded or failing (5xx): try later
    ├── GitHubError          GitHub's API answered with an error or not at all
    │   └── NotACommit       a commit SHA is malformed; refused before any request
    ├── BrokerError          RabbitMQ refused, could not route, or is unreachable
    │   └── PublishError     (shared.broker) a publish was not confirmed
    ├── MessageError         a broker message failed validation; it is dead-lettered
    └── SourceError          a source file cannot be used (bad JSON, schema, missing entry)

Errors from libraries are translated at the boundary (``raise StorageError(...) from exc``)
so callers only ever catch these.
"""

from __future__ import annotations


class OAMachineError(Exception):
    """Base of every error raised on purpose by oa-machine."""


class ConfigError(OAMachineError):
    """A setting is missing or invalid."""


class StorageError(OAMachineError):
    """Object storage failed."""


class NotFound(StorageError):
    """The storage key does not exist."""


class StorageUnavailable(StorageError):
    """The store cannot be reached or answers that it is failing (5xx, throttling): the same
    operation may succeed later."""


class GitHubError(OAMachineError):
    """GitHub's API answered with an error, or not at all.

    ``status`` is the HTTP status (None when GitHub did not answer); ``retry_after_s`` is
    GitHub's ``Retry-After`` in seconds when it sent one. ``reason`` says what went wrong first
    and briefly, for people (a commit status has 140 characters); the message has the details.
    """

    def __init__(
        self, message: str, status: int | None = None, *, retry_after_s: float | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s
        self.reason = reason or message


class NotACommit(GitHubError):
    """A commit SHA is not 40 hex characters; no request was made, and none ever can succeed."""


class BrokerError(OAMachineError):
    """RabbitMQ refused an operation, could not route a message, or is unreachable."""


class MessageError(OAMachineError):
    """A broker message is not a valid message of the expected kind."""


class SourceError(OAMachineError):
    """A source file cannot be used: bad JSON, fails the schema, or has no such entry.

    ``problem`` is one of the codes in :data:`shared.sources.SOURCE_PROBLEMS`.
    """

    def __init__(self, message: str, problem: str = "invalid_source") -> None:
        super().__init__(message)
        self.problem = problem

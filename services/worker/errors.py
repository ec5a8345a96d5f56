"""The one error a run's stages raise to fail the run with a known source problem."""

from __future__ import annotations

from shared.messages import SourceProblem


class RunError(Exception):
    """A run failed at a known stage.

    ``problem`` is set where the failure happens (never guessed later from log text) and the
    message says what and where: the file, the row number, the field.

    ``over_limit`` says a size limit was hit (a download too large, an archive expanding too
    far, too many members): the run must not keep or upload the cache of such data.
    ``transient`` says the failure may go away by itself (5xx, throttling, timeouts,
    connection resets) and the in-run retries were used up: the whole run may be tried again
    later. Both are decided where the error is raised, like ``problem``.
    """

    def __init__(
        self,
        message: str,
        problem: SourceProblem,
        *,
        over_limit: bool = False,
        transient: bool = False,
    ) -> None:
        super().__init__(message)
        self.problem: SourceProblem = problem
        self.over_limit = over_limit
        self.transient = transient

    def __str__(self) -> str:
        return str(self.args[0])


class ConformError(RunError):
    """A conform that cannot be compiled (``conform_failed``), saying where in it.

    ``key`` is the conform key at fault (an attribute, ``lon``, ``lat``, ``srs``; ``""`` for
    the conform as a whole) and ``detail`` what is wrong with it (``chain step 2: pattern '('
    does not compile: ...``), so that ``check-sources`` can point at ``conform.<key>`` in the
    file. The message, a run's error, names the attribute unless given.
    """

    def __init__(self, key: str, detail: str, *, message: str | None = None) -> None:
        super().__init__(message or f"attribute {key!r}: {detail}", "conform_failed")
        self.key = key
        self.detail = detail

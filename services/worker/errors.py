"""The one error a run's stages raise to fail the run with a known source problem."""

from __future__ import annotations

from shared.messages import SourceProblem


class RunError(Exception):
    """A run failed at a known stage.

    ``problem`` is set where the failure happens (never guessed later from log text) and the
    message says what and where: the file, the row number, the field.
    """

    def __init__(self, message: str, problem: SourceProblem) -> None:
        super().__init__(message)
        self.problem: SourceProblem = problem

    def __str__(self) -> str:
        return str(self.args[0])

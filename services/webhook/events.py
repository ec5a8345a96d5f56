"""The parts of GitHub webhook payloads the webhook reads, validated with pydantic.

Only the fields we use are declared; everything else in GitHub's payload is ignored, so a new
field on GitHub's side never breaks intake, while a missing field we need gives a 400 naming it.
"""

from __future__ import annotations

import fnmatch
from typing import Final

from pydantic import BaseModel, ConfigDict, Field

from shared.github import SHA_PATTERN

ZERO_SHA: Final = "0" * 40
SOURCE_PATTERN: Final = "sources/*.json"


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Repository(_Lenient):
    full_name: str = Field(pattern=r"^[\w.-]+/[\w.-]+$")


class Commit(_Lenient):
    id: str
    added: list[str] = Field(default_factory=list)
    modified: list[str] = Field(default_factory=list)
    removed: list[str] = Field(default_factory=list)


class PushEvent(_Lenient):
    """A ``push`` delivery."""

    ref: str
    # Full SHAs only: ``after`` goes into GitHub URLs and the status outbox, and a push with
    # anything else is not GitHub's, so it is refused with a 400 naming the field.
    before: str = Field(pattern=SHA_PATTERN)
    after: str = Field(pattern=SHA_PATTERN)
    deleted: bool = False
    repository: Repository
    commits: list[Commit] = Field(default_factory=list)

    @property
    def branch(self) -> str | None:
        """The branch name, or None for tags and other refs."""
        prefix = "refs/heads/"
        return self.ref[len(prefix):] if self.ref.startswith(prefix) else None

    @property
    def is_deletion(self) -> bool:
        return self.deleted or self.after == ZERO_SHA

    def changed_sources(self) -> list[str]:
        """Source files added or modified by the push and still present at its head, sorted.

        Commits are replayed in order so that a file added then removed is not fetched.
        """
        present: set[str] = set()
        for commit in self.commits:
            for path in (*commit.added, *commit.modified):
                if is_source_path(path):
                    present.add(path)
            for path in commit.removed:
                present.discard(path)
        return sorted(present)


def is_source_path(path: str) -> bool:
    """``sources/**/*.json`` (fnmatch's ``*`` crosses folders, which is what we want)."""
    return fnmatch.fnmatchcase(path, SOURCE_PATTERN)

"""The parts of GitHub webhook payloads the webhook reads, validated with pydantic.

Only the fields we use are declared; everything else in GitHub's payload is ignored, so a new
field on GitHub's side never breaks intake, while a missing field we need gives a 400 naming it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from pydantic import BaseModel, ConfigDict, Field

from shared.github import SHA_PATTERN, github_time
from shared.sources import is_source_path

ZERO_SHA: Final = "0" * 40


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


REPO_PATTERN: Final = r"^[\w.-]+/[\w.-]+$"


class Repository(_Lenient):
    full_name: str = Field(pattern=REPO_PATTERN)
    #: Pull requests and pushes to other branches are compared against it.
    default_branch: str = "main"


class User(_Lenient):
    login: str


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

    @property
    def on_default_branch(self) -> bool:
        return self.branch == self.repository.default_branch

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




#: Pull-request actions that make a job: new commits to check.
PR_ACTIONS: Final = frozenset({"opened", "synchronize", "reopened"})


class PullRequestSide(_Lenient):
    """``pull_request.head`` or ``pull_request.base``."""

    ref: str
    sha: str = Field(pattern=SHA_PATTERN)
    #: None when the fork the pull request came from was deleted.
    repo: Repository | None = None


class PullRequest(_Lenient):
    number: int = Field(ge=1)
    user: User
    head: PullRequestSide
    base: PullRequestSide
    #: GitHub's time of the pull request's last change (a push moves it).
    updated_at: str | None = None

    @property
    def updated(self) -> datetime | None:
        """``updated_at`` as a time; None when absent or unreadable (then it orders nothing)."""
        return github_time(self.updated_at)


class PullRequestEvent(_Lenient):
    """A ``pull_request`` delivery."""

    action: str
    number: int = Field(ge=1)
    pull_request: PullRequest
    repository: Repository

    @property
    def makes_a_job(self) -> bool:
        return self.action in PR_ACTIONS

    @property
    def head_repo(self) -> str:
        """Where the head commit lives: the fork's repository, or the base one."""
        repo = self.pull_request.head.repo
        return repo.full_name if repo is not None else self.repository.full_name


#: What a comment says to ask for a re-run (any case, anywhere in the comment).
RERUN_PHRASE: Final = "re-run this, please"
#: Who may ask for a re-run besides the pull request's author.
RERUN_ASSOCIATIONS: Final = frozenset({"OWNER", "MEMBER", "COLLABORATOR"})


class Comment(_Lenient):
    id: int
    body: str = ""
    user: User
    author_association: str = "NONE"


class Issue(_Lenient):
    number: int = Field(ge=1)
    user: User
    #: Present when the issue is a pull request.
    pull_request: dict[str, object] | None = None


class IssueCommentEvent(_Lenient):
    """An ``issue_comment`` delivery."""

    action: str
    issue: Issue
    comment: Comment
    repository: Repository

    @property
    def asks_for_rerun(self) -> bool:
        """A new comment on a pull request that contains the phrase."""
        return (
            self.action == "created" and self.issue.pull_request is not None
            and RERUN_PHRASE in self.comment.body.lower()
        )

    @property
    def may_rerun(self) -> bool:
        """The pull request's author, or a member of the repository."""
        return (
            self.comment.user.login == self.issue.user.login
            or self.comment.author_association in RERUN_ASSOCIATIONS
        )

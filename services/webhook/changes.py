"""What a delivery asks to check: the changed source files, and in them the changed entries.

Every kind of delivery becomes a :class:`Plan`: the commit to check (repository, SHA), the
commit to compare with, and the source files that changed, read at both. Only what changed
runs: an entry (one ``(layer, name)`` of a file) that is new or differs from the same entry at
the base becomes a run; an unchanged entry, a removed entry and a removed file make none. A
change to a file's top level (anything outside ``layers``: coverage, attribution) counts as a
change of all its entries, since every run's state carries it.

Where the changed files come from:

* a pull request: ``GET pulls/{n}/files`` (paginated), the head read from the head repository
  (a fork's), the base from the base repository at the pull request's base commit;
* a push to the default branch: the file lists of the push's commits, the base at ``before``;
* a push to another branch: ``GET compare/{default}...{head}``, the base at the merge base, so
  a branch's check covers everything it changes, not only its last commits. GitHub lists at
  most 300 files of a comparison; with that many the changed sources are found instead by
  comparing the two commits' trees (``GET git/trees/{sha}?recursive=1``, blob by blob).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from services.webhook.events import ZERO_SHA, PullRequestEvent, PushEvent
from shared.errors import GitHubError, SourceError
from shared.github import ChangedFile, GitHub
from shared.sources import EntryRef, get_entry, is_source_path, list_entries, load_source

#: Files read from GitHub at once for one delivery.
FETCH_CONCURRENCY = 8


@dataclass(frozen=True)
class ChangedSource:
    """One changed source file, read at the head (and at the base when it existed there)."""

    path: str
    source: dict[str, Any] | None
    #: Why the head version cannot be used (it fails its run at once), if so.
    error: SourceError | None
    #: The entries to run: new or changed since the base.
    entries: list[EntryRef] = field(default_factory=list)


@dataclass(frozen=True)
class Plan:
    """A job to make: which commit, compared with which, and what in it to check."""

    event: str
    repo: str
    head_repo: str
    sha: str
    ref: str | None
    base_sha: str | None
    pr_number: int | None
    sources: list[ChangedSource]
    #: False for a re-run asked in a comment: nothing of earlier runs is reused.
    reuse: bool = True

    @property
    def runs(self) -> int:
        return sum(max(len(item.entries), 1 if item.error else 0) for item in self.sources)


async def plan_push(event: PushEvent, github: GitHub) -> Plan:
    """The plan of a push (to the default branch or to another)."""
    repo, sha = event.repository.full_name, event.after
    if event.on_default_branch:
        paths: list[tuple[str, str | None]] = [
            (path, path) for path in event.changed_sources()
        ]
        base = event.before if event.before != ZERO_SHA else None
    else:
        comparison = await github.compare(repo, event.repository.default_branch, sha)
        base = comparison.merge_base
        if comparison.may_be_cut:
            paths = await _tree_changes(github, repo, base, sha)
        else:
            paths = _source_files(comparison.files)
    sources = await read_changes(github, paths, head_repo=repo, head_sha=sha, base_repo=repo,
                                 base_sha=base)
    return Plan("push", repo, repo, sha, event.ref, base, None, sources)


async def plan_pull_request(
    github: GitHub, *, repo: str, number: int, head_repo: str, head_sha: str, base_sha: str,
    ref: str | None, event: str = "pull_request", reuse: bool = True,
) -> Plan:
    """The plan of a pull request's head (also for a re-run, with ``reuse=False``)."""
    files = await github.pull_files(repo, number)
    sources = await read_changes(github, _source_files(files), head_repo=head_repo,
                                 head_sha=head_sha, base_repo=repo, base_sha=base_sha)
    return Plan(event, repo, head_repo, head_sha, ref, base_sha, number, sources, reuse)


async def plan_pull_request_event(event: PullRequestEvent, github: GitHub) -> Plan:
    pr = event.pull_request
    return await plan_pull_request(
        github, repo=event.repository.full_name, number=event.number,
        head_repo=event.head_repo, head_sha=pr.head.sha, base_sha=pr.base.sha, ref=pr.head.ref,
    )


async def _tree_changes(
    github: GitHub, repo: str, base: str, head: str
) -> list[tuple[str, str | None]]:
    """The changed sources of a comparison too large for ``compare`` to list, from the two
    commits' trees: a source whose blob differs at the head, or that is new there. A new path
    whose content was a source now gone is a rename, compared with the old path (as
    ``compare`` reports renames)."""
    before = {item.path: item.sha for item in await github.tree(repo, base)}
    after = await github.tree(repo, head)
    at_head = {item.path for item in after}
    renamed_from = {sha: path for path, sha in before.items()
                    if is_source_path(path) and path not in at_head}
    changed: list[tuple[str, str | None]] = []
    for item in after:
        if not is_source_path(item.path) or before.get(item.path) == item.sha:
            continue
        base_path = item.path if item.path in before else renamed_from.get(item.sha)
        changed.append((item.path, base_path))
    return sorted(changed)


def _source_files(files: Sequence[ChangedFile]) -> list[tuple[str, str | None]]:
    """``(path at the head, path at the base)`` of the changed sources still there; the base
    path is None for an added file (nothing to read there)."""
    changed: list[tuple[str, str | None]] = []
    for item in files:
        if item.status == "removed" or not is_source_path(item.filename):
            continue
        base = None if item.status == "added" else (item.previous_filename or item.filename)
        changed.append((item.filename, base))
    return sorted(set(changed), key=lambda pair: pair[0])


async def read_changes(
    github: GitHub,
    paths: Sequence[tuple[str, str | None]],
    *,
    head_repo: str,
    head_sha: str,
    base_repo: str,
    base_sha: str | None,
) -> list[ChangedSource]:
    """Read each file at both ends and keep the entries that are new or changed.

    A file GitHub no longer has at the head is left out; any other GitHub failure raises
    :class:`GitHubError`, so the delivery is tried again later as a whole. A head version that
    cannot be parsed or fails the schema is kept with its error (its run fails at once).
    """
    limit = asyncio.Semaphore(FETCH_CONCURRENCY)

    async def read(repo: str, path: str, sha: str) -> bytes | None:
        async with limit:
            try:
                return await github.get_contents(repo, path, sha)
            except GitHubError as exc:
                if exc.status == 404:
                    return None
                raise

    async def one(head_path: str, base_path: str | None) -> ChangedSource | None:
        head_bytes, base_bytes = await asyncio.gather(
            read(head_repo, head_path, head_sha),
            read(base_repo, base_path, base_sha) if base_sha and base_path else _nothing(),
        )
        if head_bytes is None:
            return None
        try:
            new = load_source(head_bytes, path=head_path)
        except SourceError as exc:
            return ChangedSource(head_path, None, exc)
        try:
            entries = changed_entries(_parsed(base_bytes, base_path or head_path), new)
        except SourceError as exc:
            return ChangedSource(head_path, None, exc)
        return ChangedSource(head_path, new, None, entries)

    found = await asyncio.gather(*(one(head, base) for head, base in paths))
    return [item for item in found if item is not None]


async def _nothing() -> None:
    return None


def _parsed(data: bytes | None, path: str) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        return load_source(data, path=path)
    except SourceError:
        return None  # a broken old file: every entry of the new one is new


def changed_entries(old: dict[str, Any] | None, new: dict[str, Any]) -> list[EntryRef]:
    """The entries of ``new`` that are not in ``old`` as they are (all of them without ``old``).

    Raises :class:`SourceError` when ``new`` lists no entry it can resolve.
    """
    refs = list_entries(new)
    if old is None:
        return refs
    if _top_level(old) != _top_level(new):
        return refs
    try:
        before = {(ref.layer, ref.name): get_entry(old, ref.layer, ref.name)
                  for ref in list_entries(old)}
    except SourceError:
        return refs
    return [ref for ref in refs
            if before.get((ref.layer, ref.name)) != get_entry(new, ref.layer, ref.name)]


def _top_level(source: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in source.items() if key != "layers"}

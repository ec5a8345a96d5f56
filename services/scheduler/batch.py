"""Batch sets: one run of every entry of every source, refreshed every week.

:func:`make_set` lists ``sources/**/*.json`` at the head of the sources repository's default
branch with one recursive trees call, reads only the files whose git blob changed since they
were last read (parsed sources are kept by blob SHA in ``source_blobs``), and makes a set with
one run per layer entry. The runs are written unqueued, longest first (by their entry's last
duration, unknown ones first), so that the set's tail is short: the dequeuer's dispatcher feeds
them to the queue as runs settle, keeping it shallow (back-pressure, ``BATCH_QUEUE_DEPTH``) and
behind pull requests (priority). All of that state is in PostgreSQL, so a restart or a failover
of the scheduler, or of a dequeuer, loses no feeding.

A file that cannot be used (not JSON, fails the schema) becomes one failed run naming the
error, as in pull requests. An entry unchanged since a good run younger than
``BATCH_REUSE_DAYS`` reuses that run's outputs when its data is unchanged too (the worker's
conditional download); ``reuse=False`` turns that off.
"""

from __future__ import annotations

import asyncio
import fnmatch
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg

from shared.config import Settings
from shared.errors import SourceError
from shared.github import GitHub, TreeFile
from shared.logging import get_logger
from shared.sets import settle_sets
from shared.sources import is_source_path, list_entries, load_source

log = get_logger(__name__)

#: Blobs read from GitHub at once.
FETCH_CONCURRENCY = 16
#: Runs written per statement.
INSERT_CHUNK = 1000


@dataclass(frozen=True)
class SetResult:
    """What :func:`make_set` made."""

    set_id: int
    runs: int
    files: int
    #: Files read from GitHub because their blob was new.
    fetched: int


@dataclass(frozen=True)
class _File:
    path: str
    blob_sha: str
    source: dict[str, Any] | None
    problem: str | None
    error: str | None


async def make_set(
    pool: asyncpg.Pool,
    github: GitHub,
    settings: Settings,
    *,
    only: str | None = None,
    reuse: bool = True,
    kind: str = "weekly",
    slot_id: str | None = None,
) -> SetResult:
    """Make a batch set of every source entry (only files matching the glob ``only``).

    ``slot_id`` names the schedule's slot making it: a slot taken again after an interruption
    gets the set it made before, if it got that far, rather than a second one.
    """
    if slot_id is not None:
        made = await pool.fetchrow(
            "SELECT id, state FROM sets WHERE slot_id = $1", slot_id)
        if made is not None:
            runs = await pool.fetchval("SELECT count(*) FROM runs WHERE set_id = $1", made["id"])
            log.info("set.made_before", set_id=made["id"], slot=slot_id)
            return SetResult(made["id"], int(runs), int(made["state"].get("files", 0)), 0)
    repo = settings.sources_repository
    _branch, head = await github.default_branch_head(repo)
    tree = [item for item in await github.tree(repo, head) if is_source_path(item.path)
            and (only is None or fnmatch.fnmatchcase(item.path, only))]
    files, fetched = await _read_files(pool, github, repo, tree)
    entries: list[tuple[str, str, str, dict[str, Any]]] = []
    failed: list[_File] = []
    for item in files:
        if item.source is None:
            failed.append(item)
            continue
        try:
            refs = list_entries(item.source)
        except SourceError as exc:
            failed.append(_File(item.path, item.blob_sha, None, exc.problem, str(exc)))
            continue
        entries.extend((item.path, ref.layer, ref.name, item.source) for ref in refs)
    ordered = await _longest_first(pool, entries)
    since = timedelta(days=settings.batch_reuse_days)
    async with pool.acquire() as conn, conn.transaction():
        set_id = await conn.fetchval(
            """
            INSERT INTO sets (kind, repo, sha, reuse, state, slot_id)
            VALUES ($1, $2, $3, $4, $5, $6) RETURNING id
            """,
            kind, repo, head, reuse, {"files": len(files), "only": only}, slot_id,
        )
        for start in range(0, len(ordered), INSERT_CHUNK):
            chunk = ordered[start:start + INSERT_CHUNK]
            await conn.execute(
                """
                INSERT INTO runs (set_id, source_path, layer, entry_name, commit_sha, source,
                                  reuse, reuse_since)
                SELECT $1, e.path, e.layer, e.name, $2, e.source, $3,
                       CASE WHEN $3 THEN now() - $4::interval END
                FROM unnest($5::text[], $6::text[], $7::text[], $8::jsonb[])
                     WITH ORDINALITY AS e(path, layer, name, source, n)
                ORDER BY e.n
                """,
                set_id, head, reuse, since, [e[0] for e in chunk], [e[1] for e in chunk],
                [e[2] for e in chunk], [e[3] for e in chunk],
            )
        if failed:
            await conn.execute(
                """
                INSERT INTO runs (set_id, source_path, layer, entry_name, commit_sha, status,
                                  source_problem, error, finished_at)
                SELECT $1, f.path, 'addresses', '', $2, 'failure', f.problem, f.error, now()
                FROM unnest($3::text[], $4::text[], $5::text[]) AS f(path, problem, error)
                """,
                set_id, head, [f.path for f in failed],
                [f.problem or "invalid_source" for f in failed], [f.error or "" for f in failed],
            )
        # A set with nothing to run (no file matched, or every file failed) is over now.
        await settle_sets(conn, [set_id])
    runs = len(ordered) + len(failed)
    log.info("set.created", set_id=set_id, repo=repo, sha=head, files=len(files),
             fetched=fetched, runs=runs, failed_files=len(failed), reuse=reuse, only=only)
    return SetResult(set_id, runs, len(files), fetched)


async def _read_files(
    pool: asyncpg.Pool, github: GitHub, repo: str, tree: list[TreeFile]
) -> tuple[list[_File], int]:
    """Each file parsed: from ``source_blobs`` when its blob was read before, else from GitHub
    (and then kept there). Returns the files and how many were fetched."""
    known = {
        row["blob_sha"]: row for row in await pool.fetch(
            "SELECT blob_sha, source, problem, error FROM source_blobs"
            " WHERE blob_sha = ANY($1::text[])",
            [item.sha for item in tree],
        )
    }
    missing = [item for item in tree if item.sha not in known]
    limit = asyncio.Semaphore(FETCH_CONCURRENCY)

    async def fetch(item: TreeFile) -> _File:
        async with limit:
            data = await github.blob(repo, item.sha)
        try:
            return _File(item.path, item.sha, load_source(data, path=item.path), None, None)
        except SourceError as exc:
            return _File(item.path, item.sha, None, exc.problem, str(exc))

    read = await asyncio.gather(*(fetch(item) for item in missing))
    if read:
        await pool.execute(
            """
            INSERT INTO source_blobs (blob_sha, path, source, problem, error)
            SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::text[], $5::text[])
            ON CONFLICT (blob_sha) DO NOTHING
            """,
            [f.blob_sha for f in read], [f.path for f in read], [f.source for f in read],
            [f.problem for f in read], [f.error for f in read],
        )
    fresh = {f.blob_sha: f for f in read}
    files = []
    for item in tree:
        if item.sha in fresh:
            files.append(fresh[item.sha])
        else:
            row = known[item.sha]
            files.append(_File(item.path, item.sha, row["source"], row["problem"], row["error"]))
    return files, len(read)


async def _longest_first(
    pool: asyncpg.Pool, entries: list[tuple[str, str, str, dict[str, Any]]]
) -> list[tuple[str, str, str, dict[str, Any]]]:
    """``entries`` by their last run's duration, longest first; never-run ones before all."""
    if not entries:
        return []
    rows = await pool.fetch(
        """
        SELECT DISTINCT ON (r.source_path, r.layer, r.entry_name)
               r.source_path, r.layer, r.entry_name,
               extract(epoch FROM r.finished_at - r.started_at) AS seconds
        FROM runs AS r
        JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(path, layer, name)
          ON r.source_path = k.path AND r.layer = k.layer AND r.entry_name = k.name
        WHERE r.status IS NOT NULL AND r.started_at IS NOT NULL
        ORDER BY r.source_path, r.layer, r.entry_name, r.finished_at DESC
        """,
        [e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries],
    )
    seconds = {(row["source_path"], row["layer"], row["entry_name"]): float(row["seconds"])
               for row in rows}
    unknown = timedelta(days=365).total_seconds()  # never run: maybe long, start it early
    return sorted(entries, key=lambda e: -seconds.get((e[0], e[1], e[2]), unknown))

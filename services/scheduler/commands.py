"""The scheduler's work on demand: ``oa-machine enqueue-sources``, ``oa-machine clean-up`` and
``oa-machine collect``.

Both do exactly what the schedule's slots do (:func:`~services.scheduler.batch.make_set`,
:func:`~services.scheduler.cleanup.clean_up`), without the leader lock: an operator may start a
set while the scheduler leads, and the two sets are then simply two sets. The runs of a set are
fed to the queue by the dequeuer, so ``--wait`` needs one running.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from services.scheduler.batch import make_set
from services.scheduler.cleanup import clean_up
from services.scheduler.collect import LAYERS, collect
from services.scheduler.coverage import draw_coverage
from shared.config import Settings
from shared.db import create_pool, migrate
from shared.github import GitHub
from shared.regions import REGIONS
from shared.sets import set_counts
from shared.storage import open_storage

#: How often ``--wait`` looks at the set.
WAIT_POLL_S = 2.0
#: ``--wait`` says how far the set is at most this often.
PROGRESS_EVERY_S = 60.0


async def enqueue_sources(
    settings: Settings,
    *,
    only: str | None,
    reuse: bool,
    wait: bool,
    say: Callable[[str], None] = print,
    poll_s: float = WAIT_POLL_S,
) -> dict[str, object] | None:
    """Make a set of every source entry (those of files matching ``only``); with ``wait``, wait
    for it to finish and say its counts as one JSON object on the last line (also returned)."""
    await migrate(settings.database_url)
    pool = await create_pool(settings.database_url, min_size=0, max_size=2)
    token = settings.github_token.get_secret_value() if settings.github_token else None
    github = GitHub.open(settings.github_api_url, token)
    try:
        made = await make_set(pool, github, settings, only=only, reuse=reuse, kind="on-demand")
        say(f"set {made.set_id}: {made.runs} runs from {made.files} files "
            f"({made.fetched} read from {settings.sources_repository})")
        if not wait:
            return None
        loop = asyncio.get_running_loop()
        said_at = loop.time()
        while True:
            row = await pool.fetchrow(
                "SELECT finished_at IS NOT NULL AS over, counts FROM sets WHERE id = $1",
                made.set_id)
            assert row is not None
            if row["over"]:
                counts = dict(row["counts"])
                break
            if loop.time() - said_at >= PROGRESS_EVERY_S:
                progress = await set_counts(pool, made.set_id)
                say(f"set {made.set_id}: {progress.get('open', 0)} of {progress['runs']} runs "
                    "still open")
                said_at = loop.time()
            await asyncio.sleep(poll_s)
        result: dict[str, object] = {"set": made.set_id, **{
            key: counts.get(key, 0)
            for key in ("runs", "succeeded", "failed", "skipped", "reused", "warned")
        }, "failed_by_problem": counts.get("failed_by_problem", {})}
        say(json.dumps(result))
        return result
    finally:
        await github.close()
        await pool.close()


async def clean_up_now(
    settings: Settings, *, dry_run: bool, say: Callable[[str], None] = print
) -> dict[str, object]:
    """Apply the retention rules once; say (and return) what was or would be removed."""
    await migrate(settings.database_url)
    pool = await create_pool(settings.database_url, min_size=0, max_size=2)
    try:
        async with open_storage(settings) as storage:
            report = await clean_up(pool, storage, settings, dry_run=dry_run)
    finally:
        await pool.close()
    for example in report.examples:
        say(f"would delete {example}")
    summary = report.as_dict()
    say(json.dumps(summary))
    return summary


async def collect_now(
    settings: Settings, *, regions: list[str] | None, layers: list[str] | None, maps: bool,
    say: Callable[[str], None] = print,
) -> list[str]:
    """Build the collections (of ``regions`` and ``layers``, default all) as the slot does;
    say one line per zip written: its storage key, size in bytes and address (feature)
    count; with ``maps``, draw the coverage maps too and say their keys."""
    await migrate(settings.database_url)
    pool = await create_pool(settings.database_url, min_size=0, max_size=2)
    lines: list[str] = []
    try:
        async with open_storage(settings) as storage:
            built = await collect(pool, storage, regions=regions or REGIONS,
                                  layers=layers or LAYERS)
            lines += [f"{b.storage_key}\t{b.size_bytes}\t{b.feature_count}" for b in built]
            if maps:
                keys = await draw_coverage(pool, storage)
                lines += [f"{key}\t{name}" for name, key in keys.items()]
    finally:
        await pool.close()
    for line in lines:
        say(line)
    return lines

"""Regional collections: one zip per region × licence class × layer of every entry's latest good
data, built by the scheduler's collections slot and ``oa-machine collect``.

Which runs: each current entry's newest run that succeeded without a regression warning, was
published (a batch set's or a push's, not a pull request's) and still has its outputs
(:data:`LATEST_GOOD_RUNS`). Which zips: :func:`shared.regions.regions_of` gives a source's
regions, its licence's ``share-alike`` its class (:mod:`services.scheduler.packaging`).

How: each zip is written front to back into :meth:`Storage.open_upload` (an S3 multipart
upload), its members read from storage as they are written. An address CSV is copied from the
run's ``processed.zip`` as its deflated bytes (:mod:`shared.zipstream`: no recompression); the
first copy of a run in a build also feeds :class:`~services.scheduler.cells.CellCounter` for
the summary. Memory stays at a few parts and chunks whatever the data's size.

Each zip gets a ``collections`` row; the two newest files of a name are kept (a download that
began before a rebuild finishes), older ones are deleted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from services.scheduler.cells import CellCounter, Cells, summary_lines
from services.scheduler.packaging import (
    GoodRun,
    collection_name,
    license_text,
    member_bases,
    readme_text,
)
from shared.errors import NotFound
from shared.logging import get_logger
from shared.regions import REGIONS, regions_of
from shared.storage import Storage
from shared.vrt import vrt_text
from shared.zipstream import LOCAL_HEADER_BYTES, Member, ZipWriter, member_data, read_members

log = get_logger(__name__)

LAYERS = ("addresses", "parcels", "buildings", "centerlines")
#: Files of each name kept in storage: the current one and the one before.
KEEP_FILES = 2
#: A processed.zip's end is read with this many bytes: its directory of three members fits.
DIRECTORY_TAIL_BYTES = 16 * 1024
#: Directories read at once before a zip is written.
DIRECTORY_READS = 16

#: The one place that says which run of an entry a collection takes. Driven by the entries
#: table (migration 0007), so that entries removed from the sources repository drop out; the
#: lateral look-up walks runs_entry_latest_idx past purged runs to an older good one.
LATEST_GOOD_RUNS = """
    SELECT g.id, g.source_path, g.layer, g.entry_name, g.commit_sha, g.finished_at, g.source,
           g.outputs, g.state
    FROM entries e
    CROSS JOIN LATERAL (
        SELECT r.* FROM runs r
        WHERE (r.source_path, r.layer, r.entry_name) = (e.source_path, e.layer, e.entry_name)
          AND r.status = 'success' AND r.warning IS NULL AND r.purged_at IS NULL
          AND site_published(r.set_id, r.job_id)
        ORDER BY r.finished_at DESC, r.id DESC
        LIMIT 1
    ) g
    WHERE e.finished_at >= (SELECT site_current_since()) AND e.good_run_id IS NOT NULL
      AND e.layer = ANY($1::text[])
    ORDER BY g.source_path, g.layer, g.entry_name
"""


@dataclass(frozen=True)
class Planned:
    """One zip to build: its region, layer, class and runs (sorted by source path)."""

    region: str
    layer: str
    share_alike: bool
    runs: tuple[GoodRun, ...]

    @property
    def name(self) -> str:
        return collection_name(self.region, self.layer, self.share_alike)


@dataclass(frozen=True)
class Built:
    """A zip written and recorded."""

    name: str
    storage_key: str
    size_bytes: int
    feature_count: int
    source_count: int
    run_ids: tuple[int, ...]


async def latest_good_runs(pool: asyncpg.Pool, layers: Sequence[str] = LAYERS) -> list[GoodRun]:
    """Every current entry's latest good run of ``layers``."""
    rows = await pool.fetch(LATEST_GOOD_RUNS, list(layers))
    return [GoodRun(run_id=row["id"], source_path=row["source_path"], layer=row["layer"],
                    entry_name=row["entry_name"], commit_sha=row["commit_sha"],
                    finished_at=row["finished_at"], source=row["source"] or {},
                    outputs=row["outputs"] or {}, state=row["state"] or {})
            for row in rows]


def plan(runs: Sequence[GoodRun], regions: Sequence[str] = REGIONS) -> list[Planned]:
    """The zips these runs make: every (region, layer, class) that has at least one run,
    in the order of :data:`REGIONS` and :data:`LAYERS`, free before share-alike."""
    groups: dict[tuple[str, str, bool], list[GoodRun]] = {}
    for run in runs:
        if _data_key(run) is None:
            continue
        for region in regions_of(run.source_path):
            if region in regions:
                groups.setdefault((region, run.layer, run.share_alike), []).append(run)
    order = {name: index for index, name in enumerate(REGIONS)}
    keys = sorted(groups, key=lambda k: (order[k[0]], LAYERS.index(k[1]), k[2]))
    return [Planned(region, layer, share_alike,
                    tuple(sorted(groups[(region, layer, share_alike)],
                                 key=lambda run: (run.source_path, run.entry_name))))
            for region, layer, share_alike in keys]


def _data_key(run: GoodRun) -> str | None:
    outputs = run.outputs
    if run.layer == "addresses":
        return outputs.get("processed.zip") or outputs.get("out.csv")
    return outputs.get("out.geojson")


class Collector:
    """Builds planned zips into ``storage`` and records them; a build's runs' cell counts are
    kept between its zips (a run is in up to three: global, continent, US region)."""

    def __init__(self, pool: asyncpg.Pool, storage: Storage, *,
                 built_at: datetime | None = None) -> None:
        self.pool = pool
        self.storage = storage
        self.built_at = built_at or datetime.now(UTC)
        self._stamp = self.built_at.strftime("%Y%m%dT%H%M%S%fZ")
        self._cells: dict[int, Cells | None] = {}
        self._directories: dict[str, tuple[tuple[Member, ...], int] | None] = {}

    async def build_all(self, *, regions: Sequence[str] = REGIONS,
                        layers: Sequence[str] = LAYERS) -> list[Built]:
        """Build every zip of ``regions`` and ``layers`` from the latest good runs."""
        runs = await latest_good_runs(self.pool, layers)
        built = []
        for planned in plan(runs, regions):
            built.append(await self.build(planned))
        return built

    async def build(self, planned: Planned) -> Built:
        """Write one zip, record it, and delete the files of its name older than the two
        newest."""
        started = time.monotonic()
        name = planned.name
        key = f"collections/{self._stamp}/{name}"
        bases = member_bases(planned.runs)
        features = sum(run.feature_count for run in planned.runs)
        summary = (f"summary/{planned.region}-summary.csv" if planned.layer == "addresses"
                   else None)
        await self._read_directories(planned.runs)
        async with self.storage.open_upload(key, content_type="application/zip") as upload:
            writer = ZipWriter(upload, when=self.built_at.timestamp())
            await writer.add_bytes("README.txt", readme_text(
                name=name, region=planned.region, layer=planned.layer,
                share_alike=planned.share_alike, built_at=self.built_at, runs=planned.runs,
                feature_count=features, summary=summary).encode())
            await writer.add_bytes("LICENSE.txt",
                                   license_text(name, planned.runs, bases).encode())
            included: list[GoodRun] = []
            for run in planned.runs:
                try:
                    if run.layer == "addresses":
                        await self._add_addresses(writer, run, bases[run.run_id])
                    else:
                        await self._add_features(writer, run, bases[run.run_id])
                except NotFound:
                    # Deleted from storage under a row that still names it: leave it out.
                    log.warning("collection.output_missing", run_id=run.run_id, name=name)
                    continue
                included.append(run)
            if summary is not None:
                cells = Cells.merge(c for run in included
                                    if (c := self._cells.get(run.run_id)) is not None)
                await writer.add_stream(summary, _aiter(summary_lines(cells)))
            await writer.close()
        built = Built(name, key, upload.size_bytes, sum(r.feature_count for r in included),
                      len({r.source_path for r in included}),
                      tuple(r.run_id for r in included))
        await self._record(planned, built)
        log.info("collection.built", name=name, key=key, size_bytes=built.size_bytes,
                 features=built.feature_count, runs=len(included),
                 seconds=round(time.monotonic() - started, 2))
        return built

    async def _add_addresses(self, writer: ZipWriter, run: GoodRun, base: str) -> None:
        csv_member = f"{base}.csv"
        want_cells = run.run_id not in self._cells
        zipped = run.outputs.get("processed.zip")
        if zipped:
            cells = await self._copy_csv(writer, run, zipped, csv_member, want_cells)
        else:
            # An old run without processed.zip: its CSV is deflated here instead.
            key = run.outputs["out.csv"]
            await self.storage.size_of(key)  # NotFound before anything is written
            counter = CellCounter(deflated=False, name=csv_member) if want_cells else None
            try:
                await writer.add_stream(csv_member, _fed(self.storage.stream(key), counter))
            finally:
                cells = await counter.finish() if counter is not None else None
        if want_cells:
            self._cells[run.run_id] = cells
        await writer.add_bytes(f"{base}.vrt", vrt_text(csv_member).encode())

    async def _copy_csv(self, writer: ZipWriter, run: GoodRun, key: str, csv_member: str,
                        want_cells: bool) -> Cells | None:
        """Copy the CSV member of ``key`` (a processed.zip) as it is stored; its cells
        counted on the way when ``want_cells``."""
        found = self._directories.get(key) or await self._directory(key)
        if found is None:
            raise NotFound(f"run {run.run_id}: {key} is missing")
        members, size = found
        csvs = [m for m in members if m.name.endswith(".csv")]
        if len(csvs) != 1:
            raise NotFound(f"run {run.run_id}: {key} has {len(csvs)} CSV members")
        member = csvs[0]
        if member.method not in (0, 8) or member.flags & 1:
            raise NotFound(f"run {run.run_id}: {member.name} is neither stored nor deflated")
        counter = (CellCounter(deflated=member.method == 8, name=csv_member) if want_cells
                   else None)
        # One read from the local header on: its length is known only once it is read.
        length = min(size - member.header_offset,
                     LOCAL_HEADER_BYTES + 2 * 0xFFFF + member.compressed_size)
        try:
            async with aclosing(self.storage.stream_range(key, member.header_offset,
                                                          length)) as chunks:
                await writer.add_raw(
                    csv_member, _fed(member_data(chunks, member), counter),
                    method=member.method, crc=member.crc,
                    compressed_size=member.compressed_size, size=member.size)
        finally:
            cells = await counter.finish() if counter is not None else None
        return cells

    async def _directory(self, key: str) -> tuple[tuple[Member, ...], int] | None:
        """A processed.zip's members and size (two requests at most; kept for the build)."""
        try:
            tail, size = await self.storage.read_tail(key, DIRECTORY_TAIL_BYTES)

            async def read_range(offset: int, length: int) -> bytes:
                return await self.storage.read_range(key, offset, length)

            found = (tuple(await read_members(read_range, size, tail=tail)), size)
        except NotFound:
            found = None
        self._directories[key] = found
        return found

    async def _read_directories(self, runs: Sequence[GoodRun]) -> None:
        """Read the directories of the runs' processed.zips a few at a time before copying:
        the copy then makes one request per run, and the round trips overlap."""
        keys = [key for run in runs if run.layer == "addresses"
                and (key := run.outputs.get("processed.zip")) and key not in self._directories]
        limit = asyncio.Semaphore(DIRECTORY_READS)

        async def read(key: str) -> None:
            async with limit:
                await self._directory(key)

        await asyncio.gather(*(read(key) for key in keys))

    async def _add_features(self, writer: ZipWriter, run: GoodRun, base: str) -> None:
        key = run.outputs["out.geojson"]
        await self.storage.size_of(key)  # NotFound before anything is written
        await writer.add_stream(f"{base}.geojson", self.storage.stream(key))

    async def _record(self, planned: Planned, built: Built) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            shas = [run.commit_sha for run in sorted(
                planned.runs, key=lambda r: (r.finished_at is not None, r.finished_at))
                if run.commit_sha]
            await conn.execute(
                """
                INSERT INTO collections (name, region, layer, share_alike, storage_key,
                    size_bytes, feature_count, source_count, run_ids, sources_sha, built_at)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                """,
                built.name, planned.region, planned.layer, planned.share_alike,
                built.storage_key, built.size_bytes, built.feature_count, built.source_count,
                list(built.run_ids), shas[-1] if shas else None, self.built_at)
            old = await conn.fetch(
                """
                SELECT id, storage_key FROM collections
                WHERE name = $1 AND deleted_at IS NULL
                ORDER BY built_at DESC, id DESC OFFSET $2
                """, built.name, KEEP_FILES)
        for row in old:
            await self.storage.delete(row["storage_key"])
            await self.pool.execute("UPDATE collections SET deleted_at = now() WHERE id = $1",
                                    row["id"])


async def _fed(chunks: AsyncIterator[bytes], counter: CellCounter | None
               ) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        if counter is not None:
            await counter.feed(chunk)
        yield chunk


async def _aiter(lines: Any) -> AsyncIterator[bytes]:
    buffer = bytearray()
    for line in lines:
        buffer += line
        if len(buffer) >= 1 << 20:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)


async def collect(pool: asyncpg.Pool, storage: Storage, *, regions: Sequence[str] = REGIONS,
                  layers: Sequence[str] = LAYERS) -> list[Built]:
    """Build every collection of ``regions`` and ``layers`` now."""
    return await Collector(pool, storage).build_all(regions=regions, layers=layers)

"""One run, child side: fetch → unpack → read → conform → write → state.

Every stage raises :class:`~services.worker.errors.RunError` with its source problem; this
module turns that into the run's state. It runs inside the isolated child process
(:mod:`services.worker.child`), so it may block and use all the memory its limit allows.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

import pyarrow as pa

from services.worker.conform.acceptance import run_acceptance_tests
from services.worker.conform.engine import GEOMETRY, Conformer
from services.worker.conform.functions import referenced_fields
from services.worker.conform.readers import open_reader
from services.worker.conform.writers import CSV_NAME, GEOJSON_NAME, OutputSummary, OutputWriter
from services.worker.errors import RunError
from services.worker.isolation import RunRequest
from services.worker.progress import SILENT, Progress, TerminalProgress
from services.worker.sources.archive import unpack
from services.worker.sources.fetch import Conditional, Download, SizeLimits, fetch
from services.worker.sources.guard import UrlPolicy
from services.worker.state import RunState
from services.worker.version import CODE_VERSION
from shared.errors import SourceError
from shared.sources import attribution, get_entry, is_skipped, validate_source

log = logging.getLogger("oa.run")
T = TypeVar("T")

SAMPLE_ROWS = 5
#: Rows per batch through the engine: big enough that the per-batch Python work and kernel
#: set-up are a small share, small enough that the batches in flight between the pipeline
#: stages keep the peak RSS low. Measured on the 1M-row benchmark CSV (best of 3):
#: 4k rows 4.7 s, 8k 3.8 s / 197 MiB, 16k 3.9 s / 212 MiB, 32k 4.4 s / 224 MiB. A CSV
#: block (1 MiB, ~10,000 rows) is already above 8k, so CSV batches are the blocks.
BATCH_ROWS = 8_192
#: Batches waiting between two pipeline stages.
_STAGE_QUEUE = 2
#: glibc mallopt parameters (malloc.h) and the values we set; see _return_freed_memory.
_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES = -1, 2 << 20
_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES = -3, 4 << 20
_M_ARENA_MAX, _ARENA_MAX = -8, 2


def run_entry(request: RunRequest) -> RunState:
    """Process the request's entry into ``request.outdir``; never raises a RunError."""
    started = time.monotonic()
    progress = TerminalProgress(sys.stderr) if request.progress else SILENT
    try:
        return _run(request, progress, started)
    finally:
        progress.close()


def _run(request: RunRequest, progress: Progress, started: float) -> RunState:
    outdir, workdir = Path(request.outdir), Path(request.workdir)
    state = _initial_state(request)
    try:
        # The webhook validated the source already; a task from elsewhere (or an old one after a
        # schema change) gets the same clear error with the JSON path here.
        validate_source(request.source, path=request.source_path)
        entry = get_entry(request.source, request.layer, request.entry_name)
        _describe(state, request.source, entry)
        if is_skipped(entry):
            log.info("source is marked skip: true; nothing to do")
            state.skipped = True
            state.source_problem = "skip_source"
            state.error = "the source entry is marked skip: true"
            return state
        conform = entry.get("conform")
        if not isinstance(conform, Mapping):
            raise RunError("the source entry has no conform section", "missing_conform")
        _acceptance(state, entry)
        progress.stage("download")
        download = _download(request, entry, conform, workdir, state, progress)
        if request.previous and (download.not_modified or _same_data(request.previous, download)):
            return _reused(state, request.previous, download)
        _keep_cache(download, outdir, state)
        progress.stage("unpack")
        data_path = unpack(
            download.path, conform, workdir / "unpacked",
            compression=entry.get("compression"), max_unpacked_bytes=request.max_unpacked_bytes,
        )
        summary = _conform(request, conform, data_path, outdir, state, progress)
        if summary.feature_count == 0:
            raise RunError("the data has no features with usable coordinates", "no_features")
    except RunError as exc:
        log.error("run failed (%s): %s", exc.problem, exc)
        state.source_problem = exc.problem
        state.error = str(exc)
        state.retryable = exc.transient
        if exc.over_limit:
            # The data that hit a size limit (an archive bomb, say) is not uploaded.
            _drop_cache(outdir, state)
    except SourceError as exc:
        log.error("run failed (%s): %s", exc.problem, exc)
        state.source_problem = exc.problem  # type: ignore[assignment]
        state.error = str(exc)
    finally:
        state.process_time = round(time.monotonic() - started, 3)
        state.processed_at = datetime.now(UTC).isoformat(timespec="seconds")
    return state


def _initial_state(request: RunRequest) -> RunState:
    return RunState.model_validate({
        "source": request.source_path, "layer": request.layer, "name": request.entry_name,
        "code version": CODE_VERSION,
    })


def _describe(state: RunState, source: Mapping[str, Any], entry: Mapping[str, Any]) -> None:
    terms = attribution(source, entry)
    state.website = terms.get("website")
    state.license = terms.get("license_text") or terms.get("license_url")
    state.attribution_required = terms.get("attribution_required")
    state.attribution_name = terms.get("attribution_name")
    state.share_alike = terms.get("share_alike")


def _acceptance(state: RunState, entry: Mapping[str, Any]) -> None:
    test = entry.get("test")
    if not isinstance(test, Mapping) or test.get("enabled") is False:
        return
    if not test.get("acceptance-tests"):
        return
    failures = run_acceptance_tests(entry)
    state.tests_passed = not failures
    if failures:
        raise RunError("acceptance tests failed: " + "; ".join(failures), "test_failed")
    log.info("acceptance tests passed")


def _download(
    request: RunRequest,
    entry: Mapping[str, Any],
    conform: Mapping[str, Any],
    workdir: Path,
    state: RunState,
    progress: Progress,
) -> Download:
    previous = request.previous or {}
    conditional = None
    if previous:
        conditional = Conditional(
            etag=previous.get("etag"), last_modified=previous.get("last_modified"),
            fingerprint=previous.get("fingerprint"),
        )
    protocol = str(entry.get("protocol", "")).lower()
    out_fields = sorted(referenced_fields(conform)) if protocol == "esri" else None
    started = time.monotonic()
    download = fetch(
        entry, workdir / "download",
        policy=UrlPolicy(allow_files=request.allow_files, allow_private=request.allow_private),
        conditional=conditional, out_fields=out_fields, progress=progress.downloaded,
        limits=SizeLimits(
            max_download_bytes=request.max_download_bytes,
            max_unpacked_bytes=request.max_unpacked_bytes,
        ),
        user_agent=request.user_agent, esri_host_limit=request.esri_host_limit,
        host_slots_dir=Path(request.host_slots_dir) if request.host_slots_dir else None,
    )
    state.cache_time = round(time.monotonic() - started, 3)
    # The data's version is the day it was downloaded, as in the reference's state.
    state.version = datetime.now(UTC).strftime("%Y%m%d")
    state.fingerprint = download.fingerprint
    state.etag = download.etag
    state.last_modified = download.last_modified
    log.info("downloaded %s bytes (md5 %s) in %.1f s", download.size_bytes,
             download.fingerprint, state.cache_time)
    return download


def _keep_cache(download: Download, outdir: Path, state: RunState) -> None:
    name = "cache" + (download.path.suffix or ".bin")
    target = outdir / name
    # A hard link costs nothing when the work and output folders share a file system.
    try:
        os.link(download.path, target)
    except OSError:
        shutil.copyfile(download.path, target)
    state.cache = name


def _drop_cache(outdir: Path, state: RunState) -> None:
    if state.cache is not None:
        (outdir / state.cache).unlink(missing_ok=True)
        log.info("removed %s from the outputs: the data hit a size limit", state.cache)
    state.cache = None


def _same_data(previous: Mapping[str, Any], download: Download) -> bool:
    return bool(previous.get("fingerprint")) and previous["fingerprint"] == download.fingerprint


def _reused(state: RunState, previous: Mapping[str, Any], download: Download) -> RunState:
    """Take the earlier run's results: same entry, same data (304 or same fingerprint)."""
    earlier = RunState.model_validate(previous["state"])
    for field in ("feature_count", "address_count", "geometry_type", "bounds",
                  "attribute_counts", "sample", "preview", "processed_zip", "cache",
                  "tests_passed", "dropped_rows", "version"):
        setattr(state, field, getattr(earlier, field))
    # An earlier state may predate "processed" naming the file (it held the time then).
    state.processed = _processed_name(state.layer) if earlier.feature_count else None
    if state.layer == "addresses" and state.address_count is None:
        state.address_count = earlier.feature_count
    state.reused_from = int(previous["run_id"])
    state.fingerprint = download.fingerprint or earlier.fingerprint
    log.info("data unchanged since run %s; reusing its outputs", state.reused_from)
    return state


def _conform(
    request: RunRequest,
    conform: Mapping[str, Any],
    data_path: Path,
    outdir: Path,
    state: RunState,
    progress: Progress,
) -> OutputSummary:
    terms = attribution(request.source, get_entry(request.source, request.layer,
                                                  request.entry_name))
    _return_freed_memory()
    with open_reader(data_path, conform, batch_rows=BATCH_ROWS) as reader:
        has_geometry = reader.geometry_type is not None
        conformer = Conformer(request.layer, conform, reader.fields, reader.crs,  # type: ignore[arg-type]
                              has_geometry=has_geometry)
        writer = OutputWriter(outdir, request.layer, source_name=request.source_path,
                              attribution=terms)
        sample_path = outdir / "sample.json"

        def conformed(batches: Iterable[pa.RecordBatch]) -> Iterator[tuple[pa.RecordBatch, int]]:
            for index, batch in enumerate(batches):
                if index == 0:
                    _write_sample(batch, sample_path)
                    state.sample = "sample.json"
                yield conformer.conform(batch), batch.num_rows

        # Three stages on their own threads: reading (Arrow's CSV parser, OGR), conforming
        # and writing (whose sinks add file and deflate threads). Arrow and NumPy kernels
        # release the GIL, so the stages overlap; short queues keep memory flat.
        progress.stage("conform")
        raw = _in_thread(_rebatched(_counted(reader.batches(), progress), BATCH_ROWS), "read")
        with raw:
            done = 0
            with _in_thread(conformed(raw), "conform") as stage:
                for out, rows in stage:
                    writer.write(out)
                    done += rows
                    progress.conformed(done)
        # Finishing the files: the zip's end, the preview.
        progress.stage("write")
        summary = writer.close()
    state.feature_count = summary.feature_count
    if request.layer == "addresses":
        state.address_count = summary.feature_count
    state.geometry_type = summary.geometry_type
    state.bounds = summary.bounds
    state.attribute_counts = summary.attribute_counts
    state.dropped_rows = conformer.dropped_rows
    files = summary.files
    state.processed = _processed_name(request.layer) if summary.feature_count else None
    state.preview = "preview.png" if "preview.png" in files else None
    state.processed_zip = "processed.zip" if "processed.zip" in files else None
    log.info("conformed %d features (%d rows dropped without usable geometry)",
             summary.feature_count, conformer.dropped_rows)
    return summary


def _processed_name(layer: str) -> str:
    """The processed data's file, as the reference's ``processed`` names it: the CSV for
    addresses (its only output), the GeoJSON for the layers that have no CSV."""
    return CSV_NAME if layer == "addresses" else GEOJSON_NAME


@functools.cache
def _return_freed_memory() -> None:
    """Keep freed memory from piling up, so the peak RSS is close to what is really in use.

    The batches of a run are allocated on one thread and freed on another. Arrow's default
    pool (mimalloc) and glibc's per-thread arenas keep such memory cached per thread, and
    glibc raises its mmap threshold after every large free, so a run's RSS settled some
    100 MiB above its live data. Hence the system pool, two arenas and fixed thresholds.
    The thresholds are a trade: at 128 KiB every batch buffer was its own mmap, and a 1M-row
    run took 220,000 page faults (about 1 s of system time on our VMs); at 4 MiB buffers
    are reused within the heap (29,000 faults) for ~15 MiB more peak RSS, and the heap is
    trimmed once 2 MiB at its top are free (docs/benchmarks.md). The child process belongs
    to one run, so these process-wide settings are its own.
    """
    pa.set_memory_pool(pa.system_memory_pool())
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
        libc.mallopt(_M_ARENA_MAX, _ARENA_MAX)


def _counted(batches: Iterator[pa.RecordBatch], progress: Progress) -> Iterator[pa.RecordBatch]:
    rows = 0
    for batch in batches:
        rows += batch.num_rows
        progress.read(rows)
        yield batch


def _rebatched(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """Batches of about ``rows`` rows: the CSV reader yields one per 1 MiB block (~10,000
    rows), and every batch costs fixed Python and kernel set-up work downstream."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        if not pending and batch.num_rows >= rows:
            yield batch
            continue
        pending.append(batch)
        count += batch.num_rows
        if count >= rows:
            yield pa.concat_batches(pending)
            pending, count = [], 0
    if pending:
        yield pending[0] if len(pending) == 1 else pa.concat_batches(pending)


class _in_thread(Generic[T]):
    """Run an iterator on its own thread, handing its items over through a short queue.

    Use as a context manager and iterate it; leaving the block stops the thread (it is
    joined before the reader or writer behind it is closed). An exception in the thread is
    raised again in the consumer, unchanged.
    """

    def __init__(self, items: Iterator[T], name: str) -> None:
        self._items = items
        self._queue: queue.Queue[tuple[bool, Any]] = queue.Queue(_STAGE_QUEUE)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"stage-{name}", daemon=True)
        self._thread.start()

    def _put(self, item: tuple[bool, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put((False, item)):
                    return
            self._put((True, None))
        except BaseException as exc:  # handed to the consumer
            self._put((True, exc))
        finally:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator[T]:
        while True:
            done, item = self._queue.get()
            if done:
                if item is not None:
                    raise item
                return
            yield item

    def __enter__(self) -> _in_thread[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def _write_sample(batch: pa.RecordBatch, path: Path) -> None:
    """``sample.json``: the header then the first raw records, as the reference wrote it."""
    names = [name for name in batch.schema.names if name != GEOMETRY]
    head = batch.slice(0, SAMPLE_ROWS)
    rows = [[head.column(name)[i].as_py() for name in names] for i in range(head.num_rows)]
    path.write_text(json.dumps([names, *rows], ensure_ascii=False))

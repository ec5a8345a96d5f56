"""``oa-machine check-sources``: everything a source file can be checked for without the network.

What a contributor runs before opening a pull request, and what the webhook and the scheduler
use to fail a broken source before any download. For each file: parsed, upgraded from v1,
validated against the bundled schema (the most relevant error of each layer entry and of each
other top-level key), its entries listed as runs would name them, every conform compiled by
the engine's own :class:`~services.worker.conform.engine.Conformer` against the fields it
names (so a bad pattern, function, ``srs`` or a CSV without ``lon``/``lat`` is caught), and
every inline acceptance test run. A run would fail with the same ``code`` as the problem.

The core is :func:`check_sources` (files and folders) and :func:`check_text` (one file's
bytes, as the webhook reads them from GitHub); both return structured problems. Importing this
module is light (the schema validator only): the engine (pyarrow, pyproj, shapely) is imported
on the first conform checked. It sits beside ``cli.py`` rather than in ``shared/`` because the
conform compiler it runs is the worker's.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import SourceError
from shared.sources import (
    EntryRef,
    list_entries,
    parse_source,
    schema_problems,
    upgrade_source,
)

__all__ = ["CheckReport", "FileReport", "Problem", "check_sources", "check_text", "source_files"]

#: Files handed to a worker process at a time: big enough that the hand-over costs nothing.
_CHUNK_FILES = 64


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file.

    ``where`` is the JSON path in the (upgraded) source, ``""`` for the file as a whole;
    ``code`` is the source problem a run of it would fail with (``invalid_source``,
    ``unknown_format``, ``unknown_protocol``, ``conform_failed``, ``test_failed``).
    """

    file: str
    where: str
    message: str
    code: str

    def __str__(self) -> str:
        return f"{self.file}: {self.where}: {self.message}" if self.where else (
            f"{self.file}: {self.message}"
        )


@dataclass
class FileReport:
    """What checking one file found: its entries, the acceptance tests run, its problems."""

    file: str
    entries: int = 0
    tests: int = 0
    tests_failed: int = 0
    problems: list[Problem] = field(default_factory=list)

    def add(self, where: str, message: str, code: str) -> None:
        self.problems.append(Problem(self.file, where, message, code))


@dataclass
class CheckReport:
    """The sum over every file checked."""

    files: int = 0
    entries: int = 0
    tests: int = 0
    tests_failed: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, report: FileReport) -> None:
        self.files += 1
        self.entries += report.entries
        self.tests += report.tests
        self.tests_failed += report.tests_failed
        self.problems.extend(report.problems)

    def summary(self) -> str:
        """``N files, M entries, K acceptance tests: all passed`` (or what failed)."""
        head = (
            f"{_count(self.files, 'file')}, {_count(self.entries, 'entry', 'entries')}, "
            f"{_count(self.tests, 'acceptance test')}"
        )
        if self.ok:
            return f"{head}: all passed"
        files = len({problem.file for problem in self.problems})
        tail = f"{_count(len(self.problems), 'problem')} in {_count(files, 'file')}"
        if self.tests_failed:
            tail += f", {_count(self.tests_failed, 'acceptance test')} failed"
        return f"{head}: {tail}"

    def to_json(self) -> dict[str, Any]:
        """The report for machines (``check-sources --json``)."""
        return {
            "ok": self.ok,
            "files": self.files,
            "entries": self.entries,
            "acceptance_tests": self.tests,
            "acceptance_tests_failed": self.tests_failed,
            "problems": [asdict(problem) for problem in self.problems],
            "summary": self.summary(),
        }


def _count(number: int, singular: str, plural: str | None = None) -> str:
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


def source_files(paths: Iterable[str | Path]) -> tuple[list[tuple[Path, str]], list[Problem]]:
    """The files to check, as (path, name to show), and a problem for each path not found.

    A file is checked whatever its name; a folder is searched for ``*.json``, inside its
    ``sources/`` folder when it has one (a checkout of the sources repository), in name order.
    """
    found: list[tuple[Path, str]] = []
    missing: list[Problem] = []
    for given in paths:
        path = Path(given)
        if path.is_file():
            found.append((path, str(given)))
        elif path.is_dir():
            root = path / "sources" if (path / "sources").is_dir() else path
            for file in sorted(root.rglob("*.json")):
                if file.is_file():
                    found.append((file, str(file)))
        else:
            missing.append(Problem(str(given), "", "no such file or folder", "invalid_source"))
    return found, missing


def check_sources(paths: Sequence[str | Path], *, jobs: int = 1) -> CheckReport:
    """Check every source file under ``paths``, on ``jobs`` processes (1: this one).

    More than one job forks this process: do that from a command line, not from a service
    with threads and connections (which should call :func:`check_text` per file, or use one
    job).
    """
    files, missing = source_files(paths)
    report = CheckReport(problems=list(missing))
    if jobs > 1 and len(files) > _CHUNK_FILES:
        # fork: the children start with this module and the validator's imports loaded.
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(jobs, mp_context=context) as pool:
            for file_report in pool.map(_check_path, files, chunksize=_CHUNK_FILES):
                report.add(file_report)
    else:
        for item in files:
            report.add(_check_path(item))
    return report


def _check_path(item: tuple[Path, str]) -> FileReport:
    path, name = item
    try:
        data = path.read_bytes()
    except OSError as exc:
        report = FileReport(name)
        report.add("", f"cannot read: {exc.strerror or exc}", "invalid_source")
        return report
    return check_text(data, name)


def check_text(data: bytes | str, name: str) -> FileReport:
    """Check one source file's contents; ``name`` is how problems name the file."""
    report = FileReport(name)
    try:
        source = upgrade_source(parse_source(data, path=name))
        problems = schema_problems(source)
    except SourceError as exc:
        report.add("", str(exc).removeprefix(f"{name}: "), exc.problem)
        return report
    except RecursionError:
        report.add("", "arrays or objects are nested too deeply to read", "invalid_source")
        return report
    for problem in problems:
        report.add(problem.where, problem.message, problem.problem)
    try:
        refs = list_entries(source)
    except SourceError as exc:
        report.add("", str(exc), exc.problem)
        return report
    report.entries = len(refs)
    broken = {problem.where for problem in problems}
    for ref in refs:
        where = f"layers.{ref.layer}[{ref.index}]"
        if any(place == where or place.startswith(where + ".") for place in broken):
            continue  # the schema error says what is wrong; the conform may not even be one
        _check_entry(report, source["layers"][ref.layer][ref.index], ref, where)
    return report


def _check_entry(report: FileReport, entry: dict[str, Any], ref: EntryRef, where: str) -> None:
    # Imported here: the engine costs a second of imports that listing files does not need.
    from services.worker.conform.acceptance import check_acceptance_tests
    from services.worker.conform.engine import Conformer
    from services.worker.conform.functions import referenced_fields
    from services.worker.errors import ConformError

    conform = entry.get("conform")
    if not isinstance(conform, dict):
        # Not a problem: upstream lists data before anyone has written its conform (seven
        # real sources do). Its runs end as missing_conform, which says so.
        return
    fields = sorted(referenced_fields(conform))
    try:
        # The run's own compiler, over a file holding exactly the fields the conform names.
        Conformer(ref.layer, conform, fields, None,  # type: ignore[arg-type]
                  has_geometry=conform.get("format") != "csv")
        results = check_acceptance_tests(entry)
    except ConformError as exc:
        place = f"{where}.conform.{exc.key}" if exc.key else f"{where}.conform"
        report.add(place, exc.detail, exc.problem)
        return
    report.tests += results.run
    report.tests_failed += len(results.failures)
    for failure in results.failures:
        report.add(f"{where}.test.acceptance-tests[{failure.index}]", str(failure), "test_failed")


def default_jobs() -> int:
    """Processes ``check-sources`` uses unless told: one per core this process may use."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)

"""The checkout tracks sources only: nothing generated, machine-specific or ignored.

A tracked virtualenv or tool binary carries the absolute paths of the machine that made it and
runs on one platform only, and a tracked `.tools/bin/uv` even stops `make` from installing
its own pinned uv (the file exists). So: `git ls-files` against the ignore rules.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Path parts that only tools and runs make.
GENERATED_PARTS = frozenset({
    "__pycache__", ".venv", ".tools", ".pytest_cache", ".mypy_cache", ".ruff_cache",
    ".DS_Store", "node_modules",
})
#: Top-level folders of local state (storage, work folders, downloaded benchmark data).
LOCAL_STATE = frozenset({"var"})
GENERATED_SUFFIXES = (".pyc", ".pyo", ".swp", "~")


def git(*args: str) -> list[str]:
    result = subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    return [line for line in result.stdout.split("\0") if line]


@pytest.fixture(scope="module")
def tracked() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (an image or an sdist): nothing to compare")
    return git("ls-files", "-z")


def test_no_tracked_file_is_ignored(tracked: list[str]) -> None:
    # -c -i: tracked files that the ignore rules (.gitignore, .git/info/exclude) would ignore.
    assert git("ls-files", "-z", "-c", "-i", "--exclude-standard") == []


def test_nothing_generated_or_machine_specific_is_tracked(tracked: list[str]) -> None:
    generated = [
        path for path in tracked
        if GENERATED_PARTS & set(PurePosixPath(path).parts)
        or PurePosixPath(path).parts[0] in LOCAL_STATE
        or path.endswith(GENERATED_SUFFIXES)
        or PurePosixPath(path).name == ".env"
    ]
    assert generated == []


def test_the_ignore_rules_cover_what_make_and_the_tests_create(tracked: list[str]) -> None:
    # What `make install`, `make run` and the tools leave in a checkout, as paths git would see.
    made = [".venv/bin/python", ".tools/bin/uv", "var/storage/runs/1/out.csv",
            "shared/__pycache__/config.cpython-311.pyc", ".pytest_cache/README.md",
            ".mypy_cache/3.11/x.json", ".ruff_cache/0.17.5/1", ".env"]
    result = subprocess.run(
        ["git", "check-ignore", "--no-index", "--stdin", "-z"], cwd=ROOT, input="\0".join(made),
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert sorted(line for line in result.stdout.split("\0") if line) == sorted(made)

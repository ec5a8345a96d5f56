"""run_isolated: a real child process per run, with wall-clock and memory limits.

The inputs are real: a local CSV and a conform whose regular expression backtracks
catastrophically on Python's ``re`` (the look-ahead keeps it off RE2), so the child really
spins until its time limit. A crash is a real SIGSEGV sent to the running child from outside;
production code has no test hooks.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from services.worker.isolation import INDEX, LOG, Limits, RunRequest, run_isolated

MEMORY = 4 * 1024**3
GOOD_CSV = "LON,LAT,NUM,STREET\n-100.1,38.1,12,Main St\n-100.2,38.2,14,Oak Ave\n"
# 40 a's and no match at the end: (a+)+ tries about 2**40 ways on Python's re.
SLOW_CSV = "LON,LAT,NUM,STREET\n-100.1,38.1,12," + "a" * 40 + "!\n"
SLOW_STREET = {"function": "regexp", "field": "STREET", "pattern": "^(?=a)(a+)+$"}


def source(data: Path, street: Any = "STREET") -> dict[str, Any]:
    return {
        "coverage": {"country": "us", "state": "ks"},
        "schema": 2,
        "layers": {"addresses": [{
            "name": "county", "data": data.as_uri(), "protocol": "http",
            "conform": {"format": "csv", "lon": "LON", "lat": "LAT", "number": "NUM",
                        "street": street},
        }]},
    }


def request(tmp_path: Path, csv_text: str, street: Any = "STREET") -> RunRequest:
    data = tmp_path / "data.csv"
    data.write_text(csv_text)
    return RunRequest(
        source=source(data, street), source_path="us/ks/county", layer="addresses",
        entry_name="county", outdir=str(tmp_path / "out"), workdir=str(tmp_path / "work"),
        allow_files=True,
    )


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie counts as gone: it runs nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def wait_for_child(req: RunRequest, timeout_s: float = 20.0) -> int:
    """The run's process id, from the first line its child writes to output.txt."""
    log = Path(req.outdir) / LOG
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.exists() and (found := re.search(r" in process (\d+)\n", log.read_text())):
            return int(found.group(1))
        await asyncio.sleep(0.02)
    raise AssertionError("the child process never started")


async def wait_until_logged(req: RunRequest, text: str, timeout_s: float = 20.0) -> None:
    log = Path(req.outdir) / LOG
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {log}")


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_a_good_run_returns_the_childs_state(tmp_path: Path) -> None:
    req = request(tmp_path, GOOD_CSV)
    state = await run_isolated(req, Limits(60, MEMORY))
    assert state.source_problem is None and state.error is None
    assert state.feature_count == 2
    out = Path(req.outdir)
    assert json.loads((out / INDEX).read_text())["feature count"] == 2
    assert (out / "out.csv").read_text().splitlines()[1].startswith("-100.1,38.1,12,Main St")
    assert "conformed 2 features" in (out / LOG).read_text()
    assert not (out / "child-stderr.txt").exists()
    pid = await wait_for_child(req)
    assert pid != os.getpid() and not alive(pid)


async def test_a_run_past_its_time_limit_is_stopped_with_its_process_group(
    tmp_path: Path,
) -> None:
    req = request(tmp_path, SLOW_CSV, SLOW_STREET)
    started = time.monotonic()
    run = asyncio.create_task(run_isolated(req, Limits(2, MEMORY)))
    pid = await wait_for_child(req)
    state = await run
    elapsed = time.monotonic() - started
    assert state.source_problem == "timeout"
    assert state.error == "the run passed its time limit of 2 s and was stopped"
    assert 2 <= elapsed < 15
    # start_new_session: the child led its own group, and the whole group was killed.
    assert group_gone(pid)
    assert not alive(pid)
    index = json.loads((Path(req.outdir) / INDEX).read_text())
    assert index["source problem"] == "timeout"
    assert index["output"] == LOG
    # The log up to the kill is kept.
    assert "downloaded" in (Path(req.outdir) / LOG).read_text()


async def test_a_memory_limit_too_small_is_out_of_memory(tmp_path: Path) -> None:
    req = request(tmp_path, GOOD_CSV)
    state = await run_isolated(req, Limits(60, 200 * 1024**2))
    assert state.source_problem == "out_of_memory", state.error
    assert "200 MiB" in (state.error or "")
    index = json.loads((Path(req.outdir) / INDEX).read_text())
    assert index["source problem"] == "out_of_memory"
    # What the child printed while failing is appended to the run's log.
    assert "--- process output ---" in (Path(req.outdir) / LOG).read_text()


async def test_a_crashed_child_is_a_failed_run_not_a_dead_worker(tmp_path: Path) -> None:
    req = request(tmp_path, SLOW_CSV, SLOW_STREET)
    run = asyncio.create_task(run_isolated(req, Limits(60, MEMORY)))
    pid = await wait_for_child(req)
    await wait_until_logged(req, "downloaded")  # it is now deep in the regular expression
    os.kill(pid, signal.SIGSEGV)
    state = await asyncio.wait_for(run, 30)
    assert state.source_problem == "conform_failed"
    assert state.error == "the run's process was killed by SIGSEGV; see output.txt"
    assert json.loads((Path(req.outdir) / INDEX).read_text())["source problem"] == (
        "conform_failed")
    assert group_gone(pid)


async def test_cancelling_the_run_kills_the_child(tmp_path: Path) -> None:
    req = request(tmp_path, SLOW_CSV, SLOW_STREET)
    run = asyncio.create_task(run_isolated(req, Limits(60, MEMORY)))
    pid = await wait_for_child(req)
    await wait_until_logged(req, "downloaded")
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert group_gone(pid)
    assert not alive(pid)


async def test_a_failing_source_gives_the_childs_own_reason(tmp_path: Path) -> None:
    req = request(tmp_path, GOOD_CSV)
    Path(req.source["layers"]["addresses"][0]["data"].removeprefix("file://")).unlink()
    state = await run_isolated(req, Limits(60, MEMORY))
    assert state.source_problem == "download_failed"
    assert "no such file" in (state.error or "")

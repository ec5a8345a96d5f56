"""The zygote: runs are forked from one pre-imported process, and losing it loses no run.

Real processes throughout: the zygote is killed with SIGKILL from outside, and a run's child
is a real process found through the pid it logs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.worker.isolation import Limits, RunRequest, run_isolated
from services.worker.state import RunState
from services.worker.zygote import ZYGOTE, Zygote, ZygoteLost
from tests.worker.test_isolation import (
    GOOD_CSV,
    MEMORY,
    SLOW_CSV,
    SLOW_STREET,
    alive,
    request,
    wait_for_child,
    wait_until_logged,
)


def folder(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


async def start_slow_run(
    tmp_path: Path, name: str
) -> tuple[RunRequest, asyncio.Task[RunState], int, subprocess.Popen[bytes]]:
    """A run spinning in a catastrophic regexp: its request, task, pid and the zygote."""
    slow = request(folder(tmp_path, name), SLOW_CSV, SLOW_STREET)
    run = asyncio.create_task(run_isolated(slow, Limits(60, MEMORY)))
    pid = await wait_for_child(slow)
    zygote = ZYGOTE._process
    assert zygote is not None
    return slow, run, pid, zygote


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


async def test_runs_are_forked_from_the_zygote_not_started_by_the_caller(
    tmp_path: Path,
) -> None:
    _, run, pid, zygote = await start_slow_run(tmp_path, "a")
    assert parent_of(pid) == zygote.pid != os.getpid()
    # Its own session and process group, so a time limit kills everything it started.
    assert os.getpgid(pid) == pid and os.getsid(pid) == pid
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)
    # A cancellation that lands while the fork's answer is on its way is honoured when the
    # answer arrives (the zygote client kills a child nobody waits for): allow it a moment.
    for _ in range(100):
        if not alive(pid):
            break
        await asyncio.sleep(0.05)
    assert not alive(pid)


async def test_a_zygote_killed_mid_run_fails_that_run_and_the_next_run_works(
    tmp_path: Path,
) -> None:
    slow, run, pid, zygote = await start_slow_run(tmp_path, "slow")
    await wait_until_logged(slow, "downloaded")
    os.kill(zygote.pid, signal.SIGKILL)
    state = await asyncio.wait_for(run, 30)
    assert state.source_problem == "conform_failed"
    assert "zygote" in (state.error or "") and "stopped" in (state.error or "")
    await asyncio.sleep(0.2)
    assert not alive(pid)  # the orphaned child was killed, not left spinning
    index = json.loads((Path(slow.outdir) / "index.json").read_text())
    assert index["source problem"] == "conform_failed"

    good = request(folder(tmp_path, "good"), GOOD_CSV)
    again = await asyncio.wait_for(run_isolated(good, Limits(60, MEMORY)), 60)
    assert again.source_problem is None and again.feature_count == 2
    assert ZYGOTE._process is not None and ZYGOTE._process.pid != zygote.pid


async def test_closing_the_zygote_ends_the_runs_it_forked(tmp_path: Path) -> None:
    zygote = Zygote()
    slow = request(tmp_path, SLOW_CSV, SLOW_STREET)
    Path(slow.workdir).mkdir(parents=True)
    Path(slow.outdir).mkdir(parents=True)
    request_path = Path(slow.workdir) / "request.json"
    request_path.write_text(json.dumps({
        "source": slow.source, "source_path": slow.source_path, "layer": slow.layer,
        "entry_name": slow.entry_name, "outdir": slow.outdir, "workdir": slow.workdir,
        "allow_files": True,
    }))
    process = await zygote.fork(
        str(request_path), str(Path(slow.outdir) / "stderr.txt"), memory_bytes=MEMORY,
        terminal=False,
    )
    await wait_until_logged(slow, "downloaded")
    assert alive(process.pid)
    await asyncio.to_thread(zygote.close)
    for _ in range(50):
        if not alive(process.pid):
            break
        await asyncio.sleep(0.1)
    assert not alive(process.pid)


@pytest.mark.parametrize(
    "answer",
    ['print("not json", flush=True)', 'print(\'{"id": 1, "pid": "x"}\', flush=True)'],
)
async def test_a_zygote_that_answers_nonsense_is_stopped_and_the_run_lost(
    tmp_path: Path, answer: str
) -> None:
    # A real process that speaks no protocol, then hangs: the fork must fail at once.
    fake = Zygote([sys.executable, "-c", f"import time\n{answer}\ntime.sleep(60)"])
    started = time.monotonic()
    with pytest.raises(ZygoteLost):
        await asyncio.wait_for(
            fake.fork(str(tmp_path / "r.json"), str(tmp_path / "o.txt"), memory_bytes=MEMORY,
                      terminal=False),
            20,
        )
    assert time.monotonic() - started < 15
    process = fake._process
    assert process is None or process.poll() is not None
    fake.close()


@pytest.mark.parametrize("service", [False, True])
def test_the_service_zygote_preloads_what_runs_download_and_draw_with(service: bool) -> None:
    """In a forked child an import costs again on every run: the worker service's zygote has
    aiohttp and Pillow's PNG writer loaded before the first fork; process-one's does not."""
    command = [sys.executable, "-m", "services.worker.zygote", *(["--service"] if service else [])]
    zygote = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert zygote.stdout is not None
        assert json.loads(zygote.stdout.readline()) == {"ready": True}
        maps = Path(f"/proc/{zygote.pid}/maps").read_text()
    finally:
        assert zygote.stdin is not None
        zygote.stdin.close()
        zygote.wait(30)
    # Compiled extensions of aiohttp and Pillow are mapped once imported.
    assert ("site-packages/aiohttp/" in maps) is service
    assert ("site-packages/PIL/" in maps) is service
    assert "site-packages/pyarrow/" in maps

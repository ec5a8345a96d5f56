"""services.up.Supervisor with real short-lived child processes."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from services.up import RestartBackoff, Supervisor, child_settings

pytestmark = pytest.mark.timeout(60)

#: Stays up and says so (the line proves output is relayed with the child's name).
STEADY = [sys.executable, "-c", "import time; print('steady up', flush=True); time.sleep(600)"]
#: Exits with status 3 at once, every time.
FLAKY = [sys.executable, "-c", "import sys; sys.exit(3)"]


def script(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code), *args]


class Lines(list[tuple[str, str]]):
    """What the supervisor printed, as (name, text)."""

    def __call__(self, name: str, text: str) -> None:
        self.append((name, text))

    def restarts(self, name: str) -> list[str]:
        """The delays announced for ``name``'s restarts, as printed."""
        pattern = re.compile(rf"{name} .*; restarting in (\S+) s")
        return [m.group(1) for n, t in self if n == "up" and (m := pattern.fullmatch(t))]


async def until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def gone(pid: int) -> bool:
    """The process no longer runs (a zombie nobody reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@pytest.fixture
async def supervisors() -> AsyncIterator[list[Supervisor]]:
    """Supervisors a test made; stopped afterwards even when the test failed."""
    made: list[Supervisor] = []
    yield made
    for supervisor in made:
        await supervisor.stop()


async def test_child_that_exits_is_restarted_with_backoff_and_the_others_untouched(
    supervisors: list[Supervisor],
) -> None:
    lines = Lines()
    supervisor = Supervisor(
        {"steady": STEADY, "flaky": FLAKY},
        backoff=RestartBackoff(first_s=0.2, max_s=0.8, reset_after_s=60), stop_grace_s=5, say=lines,
    )
    supervisors.append(supervisor)
    await supervisor.start()
    steady = supervisor.children["steady"]
    await until(lambda: len(supervisor.starts["flaky"]) >= 5)

    assert lines.restarts("flaky")[:4] == ["0.2", "0.4", "0.8", "0.8"]
    assert ("up", "flaky exited with status 3; restarting in 0.2 s") in lines
    starts = supervisor.starts["flaky"]
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    for gap, delay in zip(gaps, [0.2, 0.4, 0.8, 0.8], strict=False):
        assert gap >= delay
    # The steady one was started once and never touched.
    assert supervisor.starts["steady"] == supervisor.starts["steady"][:1]
    assert supervisor.children["steady"] is steady and steady.returncode is None
    assert ("steady", "steady up") in lines
    assert lines.restarts("steady") == []

    await supervisor.stop()
    assert steady.returncode == -signal.SIGTERM
    assert supervisor.children["flaky"].returncode is not None
    count = len(supervisor.starts["flaky"])
    await asyncio.sleep(1.0)  # past the longest backoff: nothing starts after a stop
    assert len(supervisor.starts["flaky"]) == count


async def test_child_that_exits_once_is_restarted_once_and_stays_up(
    supervisors: list[Supervisor], tmp_path: Path
) -> None:
    once = script("""
        import pathlib, sys, time
        marker = pathlib.Path(sys.argv[1])
        if not marker.exists():
            marker.touch()
            sys.exit(7)
        print("up for good", flush=True)
        time.sleep(600)
    """, str(tmp_path / "marker"))
    lines = Lines()
    supervisor = Supervisor({"once": once, "steady": STEADY},
                            backoff=RestartBackoff(first_s=0.1), say=lines)
    supervisors.append(supervisor)
    await supervisor.start()
    await until(lambda: ("once", "up for good") in lines)
    assert lines.restarts("once") == ["0.1"]
    assert ("up", "once exited with status 7; restarting in 0.1 s") in lines
    assert len(supervisor.starts["once"]) == 2
    assert len(supervisor.starts["steady"]) == 1
    running = [supervisor.children["once"], supervisor.children["steady"]]
    assert all(child.returncode is None for child in running)

    await supervisor.stop()
    assert [child.returncode for child in running] == [-signal.SIGTERM, -signal.SIGTERM]


async def test_backoff_starts_over_after_a_child_stayed_up_long_enough(
    supervisors: list[Supervisor], tmp_path: Path
) -> None:
    # Runs 1, 2 and 4 exit at once, run 3 stays up past reset_after_s first, run 5 stays up.
    counted = script("""
        import pathlib, sys, time
        counter = pathlib.Path(sys.argv[1])
        run = int(counter.read_text()) + 1 if counter.exists() else 1
        counter.write_text(str(run))
        if run == 3:
            time.sleep(1.5)
        if run >= 5:
            print("run 5 stays", flush=True)
            time.sleep(600)
        sys.exit(run)
    """, str(tmp_path / "runs"))
    lines = Lines()
    supervisor = Supervisor(
        {"counted": counted},
        backoff=RestartBackoff(first_s=0.1, max_s=5, reset_after_s=1.0), say=lines,
    )
    supervisors.append(supervisor)
    await supervisor.start()
    await until(lambda: ("counted", "run 5 stays") in lines)
    assert lines.restarts("counted") == ["0.1", "0.2", "0.1", "0.2"]
    assert [t for n, t in lines if n == "up"][2] == (
        "counted exited with status 3; restarting in 0.1 s")


async def test_stop_kills_what_ignores_sigterm_after_the_grace(
    supervisors: list[Supervisor],
) -> None:
    # The stubborn child ignores SIGTERM and has a child of its own in its process group.
    stubborn = script("""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(f"ready {grandchild.pid}", flush=True)
        time.sleep(600)
    """)
    lines = Lines()
    supervisor = Supervisor({"stubborn": stubborn, "steady": STEADY}, stop_grace_s=0.5,
                            say=lines)
    supervisors.append(supervisor)
    await supervisor.start()
    await until(lambda: any(n == "stubborn" and t.startswith("ready") for n, t in lines)
                and ("steady", "steady up") in lines)
    grandchild = int(next(t for n, t in lines if n == "stubborn").split()[1])
    children = dict(supervisor.children)

    began = time.monotonic()
    await supervisor.stop()
    assert 0.5 <= time.monotonic() - began < 5
    assert children["stubborn"].returncode == -signal.SIGKILL
    assert children["steady"].returncode == -signal.SIGTERM
    assert ("up", "stubborn did not stop in 0.5 s; killing it") in lines
    await until(lambda: gone(grandchild), timeout_s=5)


async def test_stop_during_a_backoff_returns_at_once_and_starts_nothing(
    supervisors: list[Supervisor],
) -> None:
    lines = Lines()
    supervisor = Supervisor({"flaky": FLAKY}, backoff=RestartBackoff(first_s=30), say=lines)
    supervisors.append(supervisor)
    await supervisor.start()
    await until(lambda: lines.restarts("flaky") == ["30"])
    began = time.monotonic()
    await supervisor.stop()
    assert time.monotonic() - began < 2
    assert len(supervisor.starts["flaky"]) == 1


async def test_cancelling_wait_leaves_children_for_a_graceful_stop(
    supervisors: list[Supervisor],
) -> None:
    """What `up` does on Ctrl-C: its wait is cancelled, then ``finally`` calls stop()."""
    lines = Lines()
    supervisor = Supervisor({"steady": STEADY}, say=lines)
    supervisors.append(supervisor)
    await supervisor.start()
    await until(lambda: ("steady", "steady up") in lines)
    waiting = asyncio.ensure_future(supervisor.wait())
    await asyncio.sleep(0.1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    steady = supervisor.children["steady"]
    assert steady.returncode is None
    await supervisor.stop()
    assert steady.returncode == -signal.SIGTERM  # SIGTERM, not the SIGKILL of a lost watcher
    await supervisor.wait()  # returns once stopped


async def test_command_that_cannot_start_is_retried_with_backoff(
    supervisors: list[Supervisor], tmp_path: Path
) -> None:
    lines = Lines()
    missing = str(tmp_path / "no-such-program")
    supervisor = Supervisor({"missing": [missing], "steady": STEADY},
                            backoff=RestartBackoff(first_s=0.1, max_s=0.2), say=lines)
    supervisors.append(supervisor)
    await supervisor.start()
    await until(lambda: len(supervisor.starts["missing"]) >= 3)
    assert lines.restarts("missing")[:2] == ["0.1", "0.2"]
    assert any(t.startswith("missing could not start (") for n, t in lines if n == "up")
    assert supervisor.children["steady"].returncode is None
    assert os.path.exists(missing) is False


def test_each_child_gets_its_own_metrics_port_and_the_worker_a_grace_within_the_stop() -> None:
    from services.up import STOP_GRACE_S
    from shared.config import Settings

    extra = child_settings(Settings(metrics_port=9100, worker_grace_s=90))
    ports = {name: values["METRICS_PORT"] for name, values in extra.items()}
    assert ports == {"worker": "9101", "dequeuer": "9102", "scheduler": "9103"}
    assert float(extra["worker"]["WORKER_GRACE_S"]) < STOP_GRACE_S
    free = child_settings(Settings(metrics_port=0))
    assert {values["METRICS_PORT"] for values in free.values()} == {"0"}

"""The per-host request slots shared by the runs of a worker, Retry-After, and their settings."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest

from services.worker.sources.hosts import HostSlots, host_key
from services.worker.sources.http import Retry, retry_after_s
from shared.config import load_settings
from shared.errors import ConfigError

URL = "https://maps.example.org/arcgis/rest/services/a/FeatureServer/0"


async def _peak(slot_sets: list[HostSlots], tasks: int) -> int:
    held = peak = 0

    async def request(slots: HostSlots) -> None:
        nonlocal held, peak
        async with slots.slot():
            held += 1
            peak = max(peak, held)
            await asyncio.sleep(0.01)
            held -= 1

    await asyncio.gather(*(request(slot_sets[i % len(slot_sets)]) for i in range(tasks)))
    return peak


async def test_slots_of_one_host_are_shared_through_the_folder(tmp_path: Path) -> None:
    # Two dumps of the same host (here in one process; flock locks of two opens conflict
    # just as those of two processes do).
    two = [HostSlots(tmp_path, URL, 3), HostSlots(tmp_path, URL, 3)]
    assert await _peak(two, 24) == 3


async def test_other_hosts_have_their_own_slots(tmp_path: Path) -> None:
    other = URL.replace("maps.example.org", "gis.example.net")
    both = [HostSlots(tmp_path, URL, 2), HostSlots(tmp_path, other, 2)]
    assert await _peak(both, 16) == 4
    assert host_key(URL) != host_key(other)
    assert host_key(URL) == host_key(URL.replace("https://maps", "https://MAPS"))


def test_a_killed_process_leaves_no_slot_behind(tmp_path: Path) -> None:
    script = (
        "import asyncio, sys; from pathlib import Path;"
        "from services.worker.sources.hosts import HostSlots\n"
        "async def hold():\n"
        "    async with HostSlots(Path(sys.argv[1]), sys.argv[2], 1).slot():\n"
        "        print('held', flush=True); await asyncio.sleep(60)\n"
        "asyncio.run(hold())"
    )
    slots = HostSlots(tmp_path, URL, 1)

    async def take(timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s), slots.slot():
            pass

    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), URL],
                              stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[3])
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(TimeoutError):
            asyncio.run(take(0.3))
        holder.kill()
        holder.wait(timeout=10)
        asyncio.run(take(2.0))  # the lock went with the process
    finally:
        holder.kill()
        holder.wait(timeout=10)


async def test_a_paused_host_waits_in_every_dump(tmp_path: Path) -> None:
    HostSlots(tmp_path, URL, 2).pause(0.3)
    started = time.monotonic()
    async with HostSlots(tmp_path, URL, 2).slot():
        assert time.monotonic() - started >= 0.25


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert retry_after_s("120") == 120.0
    later = datetime.now(UTC) + timedelta(seconds=30)
    assert 28 <= (retry_after_s(format_datetime(later, usegmt=True)) or 0) <= 30
    assert retry_after_s("soon") is None and retry_after_s(None) is None
    retry = Retry(backoff_s=2.0, retry_after_max_s=300.0)
    assert retry.wait_s(1, 10.0) == 10.0  # the server asked for longer than our backoff
    assert retry.wait_s(1, None) == 2.0
    assert retry.wait_s(1, 86_400.0) == 300.0  # within reason


def test_host_limit_and_user_agent_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESRI_HOST_LIMIT", "8")
    monkeypatch.setenv("USER_AGENT", "oa-ops (+mailto:ops@example.org)")
    settings = load_settings()
    assert settings.esri_host_limit == 8
    assert settings.user_agent == "oa-ops (+mailto:ops@example.org)"
    monkeypatch.setenv("ESRI_HOST_LIMIT", "0")
    with pytest.raises(ConfigError, match="ESRI_HOST_LIMIT"):
        load_settings()

"""What the site keeps between requests (views/cache.py): snapshots built once for concurrent
readers and again when too old; counts of finished sets kept for good, of open sets briefly."""

from __future__ import annotations

import asyncio

import pytest

from services.webhook.views import cache
from services.webhook.views.cache import Kept, Snapshot


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    # The module's clocks only: the event loop keeps the real one.
    monkeypatch.setattr(cache, "time", fake)
    monkeypatch.setattr(cache, "monotonic", fake)
    return fake


async def test_snapshot_is_built_once_for_concurrent_readers_and_again_when_old(
    clock: Clock,
) -> None:
    builds = 0

    async def build() -> bytes:
        nonlocal builds
        builds += 1
        await asyncio.sleep(0.01)
        return b"v%d" % builds

    snapshot: Snapshot[bytes] = Snapshot(max_age_s=10)
    answers = await asyncio.gather(*(snapshot.get(build) for _ in range(20)))
    assert builds == 1 and {value for value, _ in answers} == {b"v1"}
    clock.now += 9.9
    assert (await snapshot.get(build))[0] == b"v1"
    clock.now += 0.2
    assert (await snapshot.get(build))[0] == b"v2"
    snapshot.forget()
    assert (await snapshot.get(build))[0] == b"v3"


def test_kept_values_expire_or_stay(clock: Clock) -> None:
    kept: Kept[int, str] = Kept(size=2)
    kept.keep(1, "finished")  # for good
    kept.keep(2, "open", max_age_s=5)
    clock.now += 4.9
    assert (kept.get(1), kept.get(2)) == ("finished", "open")
    clock.now += 0.2
    assert (kept.get(1), kept.get(2)) == ("finished", None)
    kept.keep(3, "c")
    kept.get(1)  # used: 3 is now the least recently used
    kept.keep(4, "d")
    assert (kept.get(1), kept.get(3), kept.get(4)) == ("finished", None, "d")

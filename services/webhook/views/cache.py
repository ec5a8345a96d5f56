"""What the site keeps in memory between requests, and why each is safe to keep.

* The tallies of finished sets: a set that is finished has no open run left, so its counts by
  state never change again (the open set is counted on every request).
* ``state.txt``: one row per entry (thousands), built at most every :data:`STATE_MAX_AGE_S`;
  while one request builds it, the others wait for that build instead of starting their own.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from services.webhook.views.models import Tally

#: How old ``state.txt`` may be when served.
STATE_MAX_AGE_S = 10.0
#: Finished sets whose tallies are kept (a year of weekly sets, several times over).
TALLIES_KEPT = 1000


@dataclass
class Snapshot:
    """A value rebuilt when older than ``max_age_s``, one build at a time."""

    max_age_s: float
    _value: bytes | None = None
    _built_at: float = 0.0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def get(self, build: Callable[[], Awaitable[bytes]]) -> tuple[bytes, float]:
        """The value and the time it was built (``time.time()``)."""
        if self._fresh():
            assert self._value is not None
            return self._value, self._built_at
        async with self._lock:
            if not self._fresh():  # built by the request this one waited for
                self._value = await build()
                self._built_at = time.time()
            assert self._value is not None
            return self._value, self._built_at

    def _fresh(self) -> bool:
        return self._value is not None and time.time() - self._built_at < self.max_age_s


@dataclass
class SiteCache:
    """Held by the app (``keys.SITE_CACHE``): one per process, never shared across apps."""

    state_txt: Snapshot = field(default_factory=lambda: Snapshot(STATE_MAX_AGE_S))
    _tallies: OrderedDict[int, Tally] = field(default_factory=OrderedDict)

    def finished_tally(self, set_id: int) -> Tally | None:
        tally = self._tallies.get(set_id)
        if tally is not None:
            self._tallies.move_to_end(set_id)
        return tally

    def keep_tally(self, set_id: int, tally: Tally) -> None:
        """Keep the tally of a finished set (only call it with one that has no open run)."""
        self._tallies[set_id] = tally
        while len(self._tallies) > TALLIES_KEPT:
            self._tallies.popitem(last=False)

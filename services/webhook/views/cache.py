"""What the site keeps in memory between requests, and why each is safe to keep.

* The counts of sets (by state, by problem) that are not stored: a finished set stores its own
  when it finishes (``shared/sets.py``, read by ``tallies.py``); one that finished before
  those held what the site shows is counted once and kept for good, as its runs never change
  again. A set in progress is counted again once its counts are
  :data:`OPEN_SET_MAX_AGE_S` old: its page refreshes every 30 s, and counting it costs a pass
  over thousands of index entries that twenty readers would otherwise repeat every second.
* ``state.txt`` (and its ETag): one row per entry (thousands), built at most every
  :data:`STATE_MAX_AGE_S`.
* The home page's figures (totals over every entry, runs today, the latest set, the recent
  jobs, the schedule, the collections): at most :data:`HOME_MAX_AGE_S` old. They are a dozen
  queries and a few aggregates; the page is the site's most visited.

While one request builds a snapshot, the others wait for that build instead of starting their
own. Each process keeps its own (the app holds one :class:`SiteCache`).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from time import monotonic, time
from typing import Any, Generic, TypeVar

from services.webhook.views.models import Tally

#: How old ``state.txt`` may be when served.
STATE_MAX_AGE_S = 10.0
#: How old the home page's figures may be.
HOME_MAX_AGE_S = 5.0
#: How old the counts of a set in progress may be.
OPEN_SET_MAX_AGE_S = 5.0
#: Sets whose counts are kept (a year of weekly sets, several times over).
SETS_KEPT = 1000

T = TypeVar("T")
K = TypeVar("K")


@dataclass
class Snapshot(Generic[T]):
    """A value rebuilt when older than ``max_age_s``, one build at a time."""

    max_age_s: float
    _value: T | None = None
    _built_at: float = 0.0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def get(self, build: Callable[[], Awaitable[T]]) -> tuple[T, float]:
        """The value and the time it was built (``time.time()``)."""
        if self._fresh():
            assert self._value is not None
            return self._value, self._built_at
        async with self._lock:
            if not self._fresh():  # built by the request this one waited for
                self._value = await build()
                self._built_at = time()
            assert self._value is not None
            return self._value, self._built_at

    def forget(self) -> None:
        self._value = None

    def _fresh(self) -> bool:
        return self._value is not None and time() - self._built_at < self.max_age_s


@dataclass
class Kept(Generic[K, T]):
    """Values by key, the least recently used dropped past ``size``; each kept for good or
    until its own expiry."""

    size: int
    _items: OrderedDict[K, tuple[float, T]] = field(default_factory=OrderedDict)

    def get(self, key: K) -> T | None:
        found = self._items.get(key)
        if found is None:
            return None
        if found[0] < monotonic():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return found[1]

    def keep(self, key: K, value: T, max_age_s: float | None = None) -> None:
        """Keep ``value``: for good (None), or for ``max_age_s``."""
        expires = float("inf") if max_age_s is None else monotonic() + max_age_s
        self._items[key] = (expires, value)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def forget(self) -> None:
        self._items.clear()


@dataclass
class SiteCache:
    """Held by the app (``keys.SITE_CACHE``): one per process, never shared across apps."""

    #: ``state.txt``'s body and ETag.
    state_txt: Snapshot[tuple[bytes, str]] = field(
        default_factory=lambda: Snapshot(STATE_MAX_AGE_S))
    #: What ``/`` shows (``home.py``).
    home: Snapshot[Any] = field(default_factory=lambda: Snapshot(HOME_MAX_AGE_S))
    #: Runs of a set by state, and its failed and skipped runs by problem.
    set_tallies: Kept[int, Tally] = field(default_factory=lambda: Kept(SETS_KEPT))
    set_problems: Kept[int, dict[str, int]] = field(default_factory=lambda: Kept(SETS_KEPT))

    def forget(self) -> None:
        """Drop everything kept (for tests that change the data under a running app)."""
        self.state_txt.forget()
        self.home.forget()
        self.set_tallies.forget()
        self.set_problems.forget()

"""Three ways of cutting an ArcGIS layer into pages, most to least efficient.

* by ``resultOffset``, for layers that support pagination;
* by chunks of the object ids, asked for once, for layers that do not;
* by ``OBJECTID`` ranges (``where=OBJECTID >= a AND OBJECTID < b``) between the smallest and
  the largest id from the layer's statistics, when the server refuses the id list itself (too
  many ids). Ranges are sized from the layer's count (ids per feature), and a range the server
  answers short (``exceededTransferLimit``) is asked for in halves.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from services.worker.errors import RunError
from services.worker.sources.esri_client import LayerClient
from services.worker.sources.esri_pages import Answer, Fetched, Pager, TooManyFeatures

log = structlog.get_logger(__name__)

JSON = dict[str, Any]


class PagingIgnoredError(Exception):
    """The server answered a later offset with the first page again."""


def _features(data: Mapping[str, Any]) -> list[JSON]:
    return list(data.get("features") or [])


# --- by offset ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OffsetPage:
    offset: int
    size: int

    def describe(self) -> str:
        return f"offset {self.offset} ({self.size} features)"

    def split(self, size: int) -> list[OffsetPage]:
        return [
            OffsetPage(start, min(size, self.offset + self.size - start))
            for start in range(self.offset, self.offset + self.size, max(1, size))
        ]


class OffsetPlan:
    """Pages at offsets 0, size, 2 × size, ... up to the layer's count (or past it while the
    server says there is more; without a count, until a short page)."""

    def __init__(
        self, client: LayerClient, params: Mapping[str, str], expected: int | None
    ) -> None:
        self.client = client
        self.params = dict(params)
        self.expected = expected
        self._next_offset = 0
        self._past_count = False
        self._first: JSON | None = None

    def next_page(self, size: int) -> OffsetPage | None:
        beyond = self.expected is not None and self._next_offset >= self.expected
        # Page 0 is always asked for: a count of 0 may be stale like any other.
        if beyond and self._next_offset > 0 and not self._past_count:
            return None
        page = OffsetPage(self._next_offset, size)
        self._next_offset += size
        return page

    async def fetch(self, page: OffsetPage, pager: Pager) -> Answer:
        features: list[JSON] = []
        offset, wanted, more = page.offset, page.size, False
        while wanted > 0:
            params = {
                **self.params,
                "resultOffset": str(offset),
                "resultRecordCount": str(wanted),
            }
            data = await self.client.once("/query", params)
            got = _features(data)
            more = bool(data.get("exceededTransferLimit"))
            if len(got) > wanted:
                # The server ignores resultRecordCount: the rest belongs to the next page.
                got, more = got[:wanted], True
            features += got
            if not got or len(got) == wanted:
                break
            # Fewer than asked: the end, or a server limit below what it advertised (then
            # the rest of this page is asked for, and later pages are planned smaller).
            short_of_count = self.expected is not None and offset + len(got) < self.expected
            if not (more or short_of_count):
                break
            if more:
                pager.shrink(len(got), "the server returns fewer features than asked")
            offset, wanted = offset + len(got), wanted - len(got)
        return Answer(features, more)

    def finished(self, page: OffsetPage, got: Fetched) -> bool:
        if got.count == 0:
            return True
        # The whole first feature, not just its id: a layer may have no id field.
        if self._first is None:
            self._first = got.first
        elif got.first == self._first:
            raise PagingIgnoredError
        if got.count < page.size and not got.more:
            return True
        end = page.offset + got.count
        if self.expected is not None and end >= self.expected:
            if not got.more:
                return True
            # A live layer that grew since it was counted.
            self._past_count = True
        return False


# --- by object ids -------------------------------------------------------------------------


@dataclass(frozen=True)
class IdPage:
    ids: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.ids)

    def describe(self) -> str:
        return f"object ids {self.ids[0]} to {self.ids[-1]} ({len(self.ids)} ids)"

    def split(self, size: int) -> list[IdPage]:
        step = max(1, size)
        return [IdPage(self.ids[i : i + step]) for i in range(0, len(self.ids), step)]


class IdPlan:
    """Chunks of the (sorted) object ids, queried with ``objectIds``."""

    def __init__(
        self,
        client: LayerClient,
        params: Mapping[str, str],
        ids: Sequence[int],
        oid_field: str | None,
    ) -> None:
        self.client = client
        self.params = {k: v for k, v in params.items() if k != "where"}
        self.ids = ids
        self.oid_field = oid_field
        self._next = 0

    def next_page(self, size: int) -> IdPage | None:
        if self._next >= len(self.ids):
            return None
        page = IdPage(tuple(self.ids[self._next : self._next + size]))
        self._next += len(page.ids)
        return page

    async def fetch(self, page: IdPage, pager: Pager) -> Answer:
        features: list[JSON] = []
        pending = list(page.ids)
        while pending:
            params = {**self.params, "objectIds": ",".join(str(i) for i in pending)}
            got = _features(await self.client.once("/query", params))
            features += got
            returned = {(f.get("attributes") or {}).get(self.oid_field) for f in got}
            rest = [i for i in pending if i not in returned]
            if len(rest) == len(pending):
                log.warning("esri.ids_missing", url=self.client.shown, missing=len(rest))
                break
            if rest:
                # A lower limit than the server reported: ask again for the rest, and for
                # smaller chunks from now on.
                pager.shrink(len(got), "the server returns fewer features than asked")
            pending = rest
        return Answer(features)

    def finished(self, page: IdPage, got: Fetched) -> bool:
        return False


# --- by OBJECTID ranges --------------------------------------------------------------------


async def oid_bounds(client: LayerClient, oid_field: str) -> tuple[int, int] | None:
    """The smallest and largest object id, from the layer's statistics; None if refused."""
    statistics = [
        {"statisticType": kind, "onStatisticField": oid_field, "outStatisticFieldName": kind}
        for kind in ("min", "max")
    ]
    params = {
        "where": "1=1",
        "outStatistics": json.dumps(statistics, separators=(",", ":")),
        "f": "json",
    }
    try:
        data = await client.get("/query", params)
    except RunError as exc:
        if exc.problem == "no_esri_token" or exc.over_limit:
            raise
        log.warning("esri.statistics_failed", url=client.shown, error=str(exc))
        return None
    features = _features(data)
    attributes = (features[0].get("attributes") or {}) if features else {}
    # Some servers name the answer's fields after their SQL rather than as asked: take the
    # two numbers, whatever they are called.
    values = [v for v in attributes.values() if isinstance(v, int | float) and v == int(v)]
    if len(values) != 2:
        return None
    return int(min(values)), int(max(values))


@dataclass(frozen=True)
class RangePage:
    """Object ids ``low`` (included) to ``high`` (excluded), holding about ``size``."""

    low: int
    high: int
    size: int

    def describe(self) -> str:
        return f"object ids {self.low} to {self.high - 1}"

    def split(self, size: int) -> list[RangePage]:
        parts = min(self.high - self.low, math.ceil(self.size / max(1, size)))
        if parts <= 1:
            return [self]
        width = math.ceil((self.high - self.low) / parts)
        each = math.ceil(self.size / parts)
        return [
            RangePage(low, min(low + width, self.high), each)
            for low in range(self.low, self.high, width)
        ]


class RangePlan:
    """Ranges of object ids from the smallest to the largest, each about a page."""

    def __init__(
        self,
        client: LayerClient,
        params: Mapping[str, str],
        oid_field: str,
        bounds: tuple[int, int],
        expected: int | None,
    ) -> None:
        self.client = client
        self.params = dict(params)
        self.oid_field = oid_field
        self._next, self._last = bounds
        span = self._last - self._next + 1
        # Ids per feature: a layer whose rows were deleted over the years has gaps.
        self._ids_per_feature = max(1.0, span / expected) if expected else 1.0

    def next_page(self, size: int) -> RangePage | None:
        if self._next > self._last:
            return None
        width = max(1, math.floor(size * self._ids_per_feature))
        page = RangePage(self._next, min(self._next + width, self._last + 1), size)
        self._next = page.high
        return page

    async def fetch(self, page: RangePage, pager: Pager) -> Answer:
        oid = self.oid_field
        where = f"{oid} >= {page.low} AND {oid} < {page.high}"
        data = await self.client.once("/query", {**self.params, "where": where})
        features = _features(data)
        if data.get("exceededTransferLimit"):
            if page.high - page.low > 1:
                raise TooManyFeatures
            log.warning("esri.truncated", url=self.client.shown, page=page.describe())
        # The server's order within a range is its own: sort, so the dump is the same
        # whichever way the ranges were cut.
        features.sort(key=lambda f: _oid_order((f.get("attributes") or {}).get(oid)))
        return Answer(features)

    def finished(self, page: RangePage, got: Fetched) -> bool:
        return False


def _oid_order(value: Any) -> tuple[int, float]:
    return (0, float(value)) if isinstance(value, int | float) else (1, 0.0)
